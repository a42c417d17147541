//! Leave-running dumps that stop the task only for its state: its private
//! anonymous memory is write-protected with userfaultfd while it is
//! stopped, then copied while it runs again. A write the task makes to a
//! page not copied yet waits in the kernel until a handler thread has
//! saved that page as it was and lifted the protection, so what is
//! stored is the memory of the moment of the stop.
//!
//! Safety of the workload: the handler keeps serving faults until the
//! snapshot is dropped, whatever happens to the copy; dropping it closes
//! the only userfaultfd, which unregisters every range and wakes every
//! waiting fault (the kernel does the same if cryo dies).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cryo_image::proto::{PagemapEntry, Vma};
use cryo_image::{ImageError, PageReader, PageWriter};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;

use super::merge;
use super::transfer::TransferStats;
use super::{Run, PAGE};
use crate::infect::{InfectError, Victim};
use crate::sys::uffd;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Infect(#[from] InfectError),
    #[error("leave-running copy of task {pid}: {what}")]
    Copy { pid: i32, what: String },
    /// The task unmapped, moved or discarded memory not copied yet, or
    /// ended: the copy cannot be of one instant.
    #[error("leave-running copy of task {pid}: {what}")]
    MapChanged { pid: i32, what: String },
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// Why the copy cannot be a true snapshot any more.
#[derive(Clone)]
struct Failure {
    what: String,
    /// A change of the task's memory map: dumping again with the memory
    /// copied while stopped will do.
    map_changed: bool,
}

/// What the copier and the fault handler share.
struct Shared {
    pid: Pid,
    /// /proc/PID/mem, opened while the task was stopped.
    mem: std::fs::File,
    /// Runs to copy after the resume, sorted (set once, before the task
    /// can fault).
    tracked: Mutex<Vec<Run>>,
    /// Pages saved by the handler before it let a write through.
    saved: Mutex<HashMap<u64, Box<[u8]>>>,
    /// Every tracked page below this address has been copied.
    done_upto: AtomicU64,
    /// Held by the handler from reading the userfaultfd until it has
    /// judged the events read, and by the copier when it counts a batch
    /// as copied: an unmap, move or discard the handler has let go on
    /// (the kernel completes an event as it is read) is judged against
    /// the pages copied before it could change them.
    events: Mutex<()>,
    failed: Mutex<Option<Failure>>,
}

impl Shared {
    fn tracked_at(&self, addr: u64) -> bool {
        let Ok(t) = self.tracked.lock() else {
            return false;
        };
        let i = t.partition_point(|r| r.start + r.pages * PAGE <= addr);
        t.get(i).is_some_and(|r| r.start <= addr)
    }

    /// Whether [start, end) holds tracked pages not copied yet.
    fn pending_in(&self, start: u64, end: u64) -> bool {
        let start = start.max(self.done_upto.load(Ordering::SeqCst));
        let Ok(t) = self.tracked.lock() else {
            return true;
        };
        let i = t.partition_point(|r| r.start + r.pages * PAGE <= start);
        t.get(i).is_some_and(|r| r.start < end)
    }

    /// Record a failure; the first one is kept, unless a later one is a
    /// map change (which is likely its cause, and can be retried).
    fn fail(&self, what: String, map_changed: bool) {
        if let Ok(mut f) = self.failed.lock() {
            if f.as_ref().is_none_or(|f| map_changed && !f.map_changed) {
                *f = Some(Failure { what, map_changed });
            }
        }
    }

    fn failure(&self) -> Option<Failure> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }
}

/// A write-protected task whose tracked memory is still to be copied.
pub struct Snapshot {
    shared: Arc<Shared>,
    uffd: Arc<OwnedFd>,
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
    /// The registered mappings.
    ranges: Vec<(u64, u64)>,
}

impl Snapshot {
    /// Register the private anonymous memory of the stopped task `victim`
    /// for write-protect faults and start the handler. None when the task
    /// cannot have a userfaultfd (then every page is copied while it is
    /// stopped). Registering takes the task's mmap lock for writing: it
    /// comes before the page walks (smaps, PAGEMAP_SCAN) that run in
    /// parallel afterwards.
    pub fn register(victim: &mut Victim, vmas: &[Vma]) -> Result<Option<Self>> {
        let pid = victim.pid;
        let t0 = std::time::Instant::now();
        if !vmas.iter().any(super::trackable) {
            return Ok(None);
        }
        let uffd = match victim.userfaultfd(false) {
            Ok(fd) => fd,
            Err(InfectError::Syscall { errno, .. }) => {
                tracing::info!(
                    pid = pid.as_raw(),
                    %errno,
                    "no userfaultfd in the task: its memory is copied while it is stopped"
                );
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let features =
            uffd::FEATURE_EVENT_REMAP | uffd::FEATURE_EVENT_REMOVE | uffd::FEATURE_EVENT_UNMAP;
        if let Err(e) = uffd::api(&uffd, pid, features) {
            tracing::info!(
                pid = pid.as_raw(),
                "{e}: memory is copied while the task is stopped"
            );
            return Ok(None);
        }
        // cryo writes its injected code into the mapping of the injection
        // site and puts the task's word back later: that mapping (an
        // anonymous one only with JIT code) is copied while stopped, when
        // it holds the task's own code again.
        let site = victim.injection_addr();
        let mut ranges = Vec::new();
        for v in vmas
            .iter()
            .filter(|v| super::trackable(v) && !site.is_some_and(|a| v.start <= a && a < v.end))
        {
            // A range the task registered itself cannot be ours (EBUSY):
            // copy it while stopped.
            if let Err(e) = uffd::register_wp(&uffd, pid, v.start, v.end - v.start) {
                tracing::debug!(
                    pid = pid.as_raw(),
                    start = v.start,
                    "{e}: copied while stopped"
                );
                continue;
            }
            ranges.push((v.start, v.end));
        }
        let (stop_r, stop) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SnapshotError::Copy {
                pid: pid.as_raw(),
                what: format!("pipe: {e}"),
            })?;
        let mem_path = format!("/proc/{pid}/mem");
        let mem = std::fs::File::open(&mem_path).map_err(|e| SnapshotError::Copy {
            pid: pid.as_raw(),
            what: format!("{mem_path}: {e}"),
        })?;
        let shared = Arc::new(Shared {
            pid,
            mem,
            tracked: Mutex::new(Vec::new()),
            saved: Mutex::new(HashMap::new()),
            done_upto: AtomicU64::new(0),
            events: Mutex::new(()),
            failed: Mutex::new(None),
        });
        let uffd = Arc::new(uffd);
        // The handler runs before anything is protected: a write cryo makes
        // into the task from here on (ptrace, the parasite's frames) must
        // not wait on it.
        let handler = {
            let (shared, uffd) = (shared.clone(), uffd.clone());
            std::thread::Builder::new()
                .name(format!("uffd-{pid}"))
                .spawn(move || handle_faults(&shared, &uffd, &stop_r))
                .map_err(|e| SnapshotError::Copy {
                    pid: pid.as_raw(),
                    what: format!("starting the fault handler: {e}"),
                })?
        };
        tracing::debug!(
            pid = pid.as_raw(),
            ranges = ranges.len(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "private memory registered with userfaultfd"
        );
        Ok(Some(Snapshot {
            shared,
            uffd,
            stop,
            handler: Some(handler),
            ranges,
        }))
    }

    /// Write-protect the registered memory and take its runs out of
    /// `runs`: they are copied by [`Snapshot::copy`] once the task runs.
    pub fn protect(&mut self, runs: &mut Vec<Run>) -> Result<()> {
        let pid = self.shared.pid;
        let t0 = std::time::Instant::now();
        let ranges = &self.ranges;
        let (tracked, rest): (Vec<Run>, Vec<Run>) = runs
            .iter()
            .partition(|r| ranges.iter().any(|&(s, e)| r.start >= s && r.start < e));
        for &(s, e) in ranges {
            if !tracked.iter().any(|r| r.start >= s && r.start < e) {
                continue; // nothing present: nothing to keep
            }
            if let Err(err) = uffd::writeprotect(&self.uffd, pid, s, e - s, true) {
                return Err(SnapshotError::Copy {
                    pid: pid.as_raw(),
                    what: format!("write-protecting {s:#x}-{e:#x}: {err}"),
                });
            }
        }
        tracing::debug!(
            pid = pid.as_raw(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            pages = tracked.iter().map(|r| r.pages).sum::<u64>(),
            "memory write-protected, copied after the resume"
        );
        if let Ok(mut t) = self.shared.tracked.lock() {
            *t = tracked;
        }
        *runs = rest;
        Ok(())
    }

    /// Write the final pages file `out`: the pages captured while stopped
    /// (`stopped`, described by `entries`, in address order, with the
    /// pages kept in a parent) merged in address order with the tracked
    /// pages, read from the running task now. Returns the merged entries
    /// and the figures of the tracked pages.
    pub fn copy(
        &self,
        stopped: &PageReader,
        entries: &[PagemapEntry],
        out: &mut PageWriter,
    ) -> Result<(Vec<PagemapEntry>, TransferStats)> {
        let sh = &self.shared;
        let pid = sh.pid.as_raw();
        let tracked = sh.tracked.lock().map(|t| t.clone()).unwrap_or_default();
        let mut saved_pages = 0u64;
        // A batch that cannot be read or unprotected any more was
        // unmapped, moved or made unreadable by the task (it was mapped
        // and readable at the stop), or the task has ended since (ESRCH,
        // a process of a tree that exits): a map change, as dumping again
        // copies what is there then while it is stopped.
        let moved = |what: String, errno: Errno| {
            let why = if errno == Errno::ESRCH {
                "the task ended before cryo had copied its memory"
            } else {
                "the task changed its memory map before cryo had copied it"
            };
            sh.fail(format!("{why}: {what}"), true);
            what
        };
        // Batch by batch: read, replace pages the handler saved before a
        // write, lift the protection, count the batch as copied.
        let mut fetch = |start: u64, buf: &mut [u8]| -> std::result::Result<(), String> {
            if let Some(f) = sh.failure() {
                return Err(f.what);
            }
            if crate::fault::check("in-copy") {
                return Err("fault injected (CRYO_FAULT=fail-in-copy)".into());
            }
            let len = buf.len() as u64;
            read_task(&sh.mem, start, buf).map_err(|e| {
                let what = format!("reading {start:#x}-{:#x}: {e}", start + len);
                match e {
                    Errno::EFAULT | Errno::ENOMEM | Errno::ESRCH | Errno::EIO => moved(what, e),
                    _ => what,
                }
            })?;
            if let Ok(mut saved) = sh.saved.lock() {
                for (i, page) in buf.chunks_exact_mut(PAGE as usize).enumerate() {
                    if let Some(p) = saved.remove(&(start + i as u64 * PAGE)) {
                        saved_pages += 1;
                        page.copy_from_slice(&p);
                    }
                }
            }
            // Succeeds only once no unmap or move is in flight (EAGAIN
            // until the handler has read its event), so one that changed
            // what was read above has been judged when the lock is taken
            // below. ENOENT: part of the batch is not registered any more
            // (unmapped, or mapped anew); ESRCH: the task has ended.
            loop {
                match uffd::writeprotect(&self.uffd, sh.pid, start, len, false) {
                    Ok(()) => break,
                    // An event is waiting for the handler: let it run.
                    Err(e) if e.errno == Errno::EAGAIN => std::thread::yield_now(),
                    Err(e) if matches!(e.errno, Errno::ENOENT | Errno::ESRCH) => {
                        return Err(moved(format!("unprotecting {start:#x}: {e}"), e.errno))
                    }
                    Err(e) => return Err(format!("unprotecting {start:#x}: {e}")),
                }
            }
            let _judged = sh.events.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = sh.failure() {
                return Err(f.what);
            }
            sh.done_upto.store(start + len, Ordering::SeqCst);
            Ok(())
        };
        let merged = merge::merge(stopped, entries, &tracked, out, &mut fetch);
        if let Some(Failure {
            what,
            map_changed: true,
        }) = sh.failure()
        {
            return Err(SnapshotError::MapChanged { pid, what });
        }
        let (merged, mut stats) = merged.map_err(|e| match e {
            merge::MergeError::Image(e) => SnapshotError::Image(e),
            merge::MergeError::Fetch(what) => SnapshotError::Copy { pid, what },
        })?;
        self.check()?;
        stats.pages_copied_running = stats.pages_scanned;
        stats.pages_saved_on_write = saved_pages;
        Ok((merged, stats))
    }

    fn check(&self) -> Result<()> {
        match self.shared.failure() {
            Some(f) => Err(SnapshotError::Copy {
                pid: self.shared.pid.as_raw(),
                what: f.what,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = nix::unistd::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        // The last reference to the userfaultfd goes with `self.uffd`:
        // the kernel unregisters the task's ranges.
    }
}

/// Read the task's memory through the /proc/PID/mem descriptor opened
/// while it was stopped: that descriptor holds the address space of that
/// moment, so a task that calls exec meanwhile is not read in its new
/// one (the reads fail once the old one is gone).
fn read_task(mem: &std::fs::File, addr: u64, out: &mut [u8]) -> std::result::Result<(), Errno> {
    use std::os::unix::fs::FileExt;
    mem.read_exact_at(out, addr)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EFAULT)))
}

/// Serve the task's write-protect faults until `stop` is written: save
/// the page as it is, then let the write through. Events that change the
/// memory map over pages not copied yet make the copy fail (the task goes
/// on either way).
fn handle_faults(sh: &Shared, uffd: &OwnedFd, stop: &OwnedFd) {
    let mut page = vec![0u8; PAGE as usize];
    let mut queue = std::collections::VecDeque::new();
    loop {
        if queue.is_empty() {
            let mut fds = [
                PollFd::new(uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => return,
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
            read_msgs(sh, uffd, &mut queue);
        }
        let Some(m) = queue.pop_front() else {
            continue;
        };
        let addr = m.b & !(PAGE - 1);
        if m.a & uffd::PAGEFAULT_FLAG_WP != 0
            && sh.tracked_at(addr)
            && addr >= sh.done_upto.load(Ordering::SeqCst)
        {
            match read_task(&sh.mem, addr, &mut page) {
                Ok(()) => {
                    if let Ok(mut s) = sh.saved.lock() {
                        s.entry(addr).or_insert_with(|| page.clone().into());
                    }
                }
                // Unmapped or made unreadable by another thread meanwhile,
                // or the task is ending.
                Err(e) => sh.fail(
                    format!("saving page {addr:#x} before a write: {e}"),
                    matches!(e, Errno::EFAULT | Errno::ENOMEM | Errno::ESRCH | Errno::EIO),
                ),
            }
        }
        // Lift the protection of this page and wake the writer. EAGAIN: an
        // event must be read first (the faults read with it wait their
        // turn).
        loop {
            match uffd::writeprotect(uffd, sh.pid, addr, PAGE, false) {
                Err(e) if e.errno == Errno::EAGAIN => {
                    if !read_msgs(sh, uffd, &mut queue) {
                        std::thread::yield_now();
                    }
                }
                // Not registered any more (unmapped or mapped anew by
                // another thread): wake the writer, which then faults on
                // what is there now.
                Err(e) if e.errno == Errno::ENOENT => {
                    let _ = uffd::wake(uffd, sh.pid, addr, PAGE);
                    break;
                }
                Err(e) => {
                    sh.fail(format!("letting a write to {addr:#x} through: {e}"), false);
                    break;
                }
                Ok(()) => break,
            }
        }
    }
}

/// Read what the userfaultfd has queued: judge the events at once (under
/// [`Shared::events`], before the copier can count more pages copied) and
/// append the faults to `queue`. Whether anything was read.
fn read_msgs(
    sh: &Shared,
    uffd: &OwnedFd,
    queue: &mut std::collections::VecDeque<uffd::Msg>,
) -> bool {
    let mut buf = [0u8; uffd::MSG_LEN * 64];
    let judging = sh.events.lock().unwrap_or_else(|e| e.into_inner());
    match nix::unistd::read(uffd, &mut buf) {
        Ok(n) => {
            for m in buf[..n].chunks_exact(uffd::MSG_LEN).map(uffd::Msg::parse) {
                if m.event == uffd::EVENT_PAGEFAULT {
                    queue.push_back(m);
                } else {
                    map_event(sh, &m);
                }
            }
            n > 0
        }
        Err(Errno::EAGAIN | Errno::EINTR) => false,
        Err(e) => {
            drop(judging);
            sh.fail(format!("reading the userfaultfd: {e}"), false);
            std::thread::sleep(std::time::Duration::from_millis(1));
            false
        }
    }
}

fn map_event(sh: &Shared, m: &uffd::Msg) {
    let (what, start, end) = match m.event {
        uffd::EVENT_REMOVE => ("discarded (madvise)", m.a, m.b),
        uffd::EVENT_UNMAP => ("unmapped", m.a, m.b),
        uffd::EVENT_REMAP => ("moved (mremap)", m.a, m.a + m.c),
        _ => return,
    };
    if sh.pending_in(start, end) {
        sh.fail(
            format!("the task {what} memory at {start:#x}-{end:#x} before cryo had copied it"),
            true,
        );
    }
}
