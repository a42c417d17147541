//! Short-lived probe children and process-wide prctls, for `cryo check`:
//! a child that waits to be traced, a child that tries one unshare, a
//! clone3 child with a chosen pid that exits at once, the size of struct
//! prctl_mm_map and the POSIX timer id mode.
//!
//! The children are made with fork or clone3 from a process that may run
//! other threads, so each one only makes raw system calls and leaves with
//! _exit: it never allocates, takes a lock or returns into Rust code that
//! could. That is why the wrappers are safe while fork itself is not.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::unistd::Pid;

/// fork(); the child runs `child` and leaves with _exit of what it
/// returns. Returns the child's pid.
///
/// # Safety
/// `child` runs in a copy of a possibly multi-threaded process in which
/// only the calling thread exists, so it must make async-signal-safe calls
/// only: no allocation, no locks (another thread may have held one at the
/// fork), no panics, no Rust destructors of shared state.
unsafe fn fork_with(child: impl FnOnce() -> i32) -> Result<Pid, Errno> {
    // SAFETY: fork() duplicates only the calling thread. The child runs
    // only `child`, which the caller promises is async-signal-safe, then
    // leaves through _exit without running destructors or atexit handlers.
    // The parent keeps ownership of every Rust value as usual.
    match unsafe { libc::fork() } {
        -1 => Err(Errno::last()),
        0 => {
            let code = child();
            // SAFETY: _exit ends the child at once and is async-signal-safe;
            // nothing in the child needs to be flushed or dropped.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(Pid::from_raw(pid)),
    }
}

/// A child that dies with its parent (PR_SET_PDEATHSIG SIGKILL) and
/// otherwise pauses until it is killed: something to trace.
pub fn fork_paused() -> Result<Pid, Errno> {
    let child = || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) and pause take integers only and
        // touch no memory of ours.
        unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            loop {
                libc::pause();
            }
        }
    };
    // SAFETY: the child only calls prctl and pause, plain system calls that
    // are async-signal-safe.
    unsafe { fork_with(child) }
}

/// A child that calls unshare(`flags`) and exits with 0 when it worked,
/// else with the errno (its low 8 bits, what an exit status keeps).
pub fn fork_unshare(flags: i32) -> Result<Pid, Errno> {
    let child = || {
        // SAFETY: unshare takes an integer only and touches no memory of ours.
        if unsafe { libc::unshare(flags) } == 0 {
            0
        } else {
            Errno::last_raw() & 0xff
        }
    };
    // SAFETY: the child only calls unshare, a plain system call, and reads
    // errno, a thread-local load: both async-signal-safe.
    unsafe { fork_with(child) }
}

/// clone3 a child with exactly pid `pid` (set_tid) that exits with status
/// 0 at once; SIGCHLD tells the parent. Returns the child's pid.
pub fn clone3_exiting(pid: i32) -> Result<i32, Errno> {
    // SAFETY: clone3_with_pid wants a single-threaded caller because the
    // child inherits locks other threads may hold; this child takes none:
    // back from the call, it leaves with a raw exit system call before
    // anything else runs.
    let r = unsafe { super::clone3_with_pid(&[pid], libc::SIGCHLD, 0) }?;
    if r == 0 {
        // SAFETY: in the child of the clone3 above: a raw exit syscall ends
        // this (single-threaded) process at once; _exit is the fallback and
        // never returns.
        unsafe {
            libc::syscall(libc::SYS_exit, 0);
            libc::_exit(0);
        }
    }
    Ok(r)
}

const PR_SET_MM: libc::c_int = 35;
const PR_SET_MM_MAP_SIZE: libc::c_ulong = 15;
const PR_TIMER_CREATE_RESTORE_IDS: libc::c_int = 77;
const PR_TIMER_CREATE_RESTORE_IDS_GET: libc::c_ulong = 2;

/// The size of struct prctl_mm_map this kernel expects
/// (prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)).
pub fn mm_map_size() -> Result<u32, Errno> {
    let mut size: u32 = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE only writes one u32 (the size of struct
    // prctl_mm_map) to arg3, which points at our live local `size`.
    let r = unsafe {
        libc::prctl(
            PR_SET_MM,
            PR_SET_MM_MAP_SIZE,
            &mut size as *mut u32 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    Errno::result(r)?;
    Ok(size)
}

/// The calling thread's POSIX timer id mode
/// (prctl(PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_GET)).
pub fn timer_restore_ids_mode() -> Result<i32, Errno> {
    // SAFETY: the GET operation only returns the current mode; it takes no
    // pointers and changes no state.
    let r = unsafe {
        libc::prctl(
            PR_TIMER_CREATE_RESTORE_IDS,
            PR_TIMER_CREATE_RESTORE_IDS_GET,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    Errno::result(r)
}

/// Whether this process is down to one thread, waiting up to half a
/// second: worker threads just joined may take a moment to leave the
/// thread group (the kernel counts them until their exit completes).
pub(crate) fn wait_single_threaded() -> bool {
    for _ in 0..500 {
        if own_threads() == Some(1) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    own_threads() == Some(1)
}

/// The number of threads of this process (/proc/self/status `Threads:`).
fn own_threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// How a task of a restore is made.
#[derive(Debug, Clone, Copy)]
pub struct NewTask<'a> {
    /// Its pid at each level, innermost first (clone3 `set_tid`).
    pub set_tid: &'a [i32],
    pub exit_signal: i32,
    /// Sharing the filesystem information (CLONE_FS), the descriptor
    /// table (CLONE_FILES) with its creator.
    pub share_fs: bool,
    pub share_files: bool,
    /// The init of a new pid namespace (CLONE_NEWPID).
    pub new_pid_ns: bool,
    /// A child of this process's parent, not of this process
    /// (CLONE_PARENT).
    pub sibling: bool,
}

/// clone3 with exactly the pids of `t` (set_tid) and its exit signal,
/// like fork(), sharing what it says: returns 0 in the child and the
/// child's pid (as this process sees it) in the parent. Refused with
/// EDEADLK unless this process runs one thread only (the child of a
/// multi-threaded process could inherit locks that no thread of it will
/// ever release), which is what makes it safe to call.
pub fn fork_with_pid(t: &NewTask) -> Result<i32, Errno> {
    if !wait_single_threaded() {
        return Err(Errno::EDEADLK);
    }
    let mut flags = 0u64;
    for (on, flag) in [
        (t.share_fs, libc::CLONE_FS),
        (t.share_files, libc::CLONE_FILES),
        (t.new_pid_ns, libc::CLONE_NEWPID),
        (t.sibling, libc::CLONE_PARENT),
    ] {
        if on {
            flags |= flag as u64;
        }
    }
    // SAFETY: this process is single-threaded (checked just above; a
    // single-threaded process cannot gain a thread between the check and
    // the call, as only this thread could make one); CLONE_FS only shares
    // the working directory, root and umask with the child, CLONE_FILES
    // the descriptor table (the restore orders who changes it, see
    // files::table); CLONE_NEWPID only puts the child in a new pid
    // namespace; CLONE_PARENT only gives the child this process's parent
    // (it is still traced and waited for by the caller through ptrace).
    unsafe { super::clone3_with_pid(t.set_tid, t.exit_signal, flags) }
}

/// Block every signal of this thread.
pub fn block_all_signals() {
    let all = nix::sys::signal::SigSet::all();
    let _ =
        nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&all), None);
}

/// End this process the way a dumped zombie ended (its wait status): die
/// of its signal (without a core dump), or exit with its code.
pub fn exit_like(status: u32) -> ! {
    let sig = (status & 0x7f) as i32;
    if sig != 0 {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads `zero`, a live local; signal() resets the
        // disposition to the default (no handler of ours runs); the mask
        // and kill calls take plain values. The process dies of `sig`.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
    }
    exit_now(((status >> 8) & 0xff) as i32)
}

/// _exit: end this process at once, without running destructors, atexit
/// handlers or stdio flushes (a task of a restore that is done, or a
/// helper).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an integer and never returns; skipping the
    // process's destructors is the point (nothing of cryo's needs them in a
    // new task).
    unsafe { libc::_exit(code) }
}

/// How much later than asked a CPU-time interval timer (ITIMER_VIRTUAL,
/// ITIMER_PROF) of this kernel expires: setitimer adds one scheduler tick
/// to the value (the kernel's set_cpu_itimer), so a timer set again from
/// the time it had left would drift a tick later at every restore.
/// Measured on this process's ITIMER_PROF (set, read back, cleared), in
/// microseconds rounded up to 50 (a value a little short fires a few
/// microseconds early rather than a tick late); 0 if it cannot be read.
pub fn cpu_itimer_slack_us() -> u64 {
    const ASKED: i64 = 100;
    let tv = |sec: i64| libc::timeval {
        tv_sec: sec,
        tv_usec: 0,
    };
    let set = libc::itimerval {
        it_interval: tv(0),
        it_value: tv(ASKED),
    };
    let off = libc::itimerval {
        it_interval: tv(0),
        it_value: tv(0),
    };
    let mut got = off;
    // SAFETY: setitimer and getitimer read and write itimervals that are
    // live locals; the timer is this process's ITIMER_PROF, which cryo does
    // not use otherwise, and it is cleared before return.
    let ok = unsafe {
        libc::setitimer(libc::ITIMER_PROF, &set, std::ptr::null_mut()) == 0
            && libc::getitimer(libc::ITIMER_PROF, &mut got) == 0
    };
    // SAFETY: as above: clearing our own ITIMER_PROF.
    unsafe { libc::setitimer(libc::ITIMER_PROF, &off, std::ptr::null_mut()) };
    if !ok {
        return 0;
    }
    let got_us = got.it_value.tv_sec * 1_000_000 + got.it_value.tv_usec;
    let extra = got_us - ASKED * 1_000_000;
    if extra <= 0 {
        return 0;
    }
    (extra as u64).div_ceil(50) * 50
}

/// The kernel's `struct sched_attr` up to its first version
/// (SCHED_ATTR_SIZE_VER0, 48 bytes): policy, flags, nice, the real-time
/// priority and the SCHED_DEADLINE parameters.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedAttr {
    pub size: u32,
    pub policy: u32,
    pub flags: u64,
    pub nice: i32,
    pub priority: u32,
    pub runtime: u64,
    pub deadline: u64,
    pub period: u64,
}
const _: () = assert!(std::mem::size_of::<SchedAttr>() == 48);

/// sched_getattr(2) of task `tid`.
pub fn sched_getattr(tid: i32) -> Result<SchedAttr, Errno> {
    let mut a = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: the kernel writes at most `size` bytes (the struct's size)
    // into `a`, a live local of that size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut a as *mut SchedAttr,
            size,
            0,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(a)
}

/// sched_setattr(2) of task `tid`.
pub fn sched_setattr(tid: i32, a: &SchedAttr) -> Result<(), Errno> {
    let mut a = *a;
    a.size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: the kernel reads `a.size` bytes from `a`, a live local of
    // exactly that size.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &a as *const SchedAttr, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The nice value of task `tid` (getpriority(PRIO_PROCESS, tid)), which
/// sched_getattr leaves out for a real-time thread.
pub fn nice_of(tid: i32) -> Result<i32, Errno> {
    Errno::clear();
    // SAFETY: getpriority takes integers and touches no memory of ours.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    if n == -1 && Errno::last_raw() != 0 {
        return Err(Errno::last());
    }
    Ok(n)
}

/// A pidfd of a child that exited at once and was reaped.
pub fn reaped_child_pidfd() -> Result<OwnedFd, Errno> {
    // SAFETY: the child calls only _exit (async-signal-safe), so forking a
    // multi-threaded process is sound; the parent waits for that child
    // only.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Errno::last());
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe { libc::_exit(0) };
    }
    let child = Pid::from_raw(pid);
    // Open while it is still a zombie, then reap it.
    let fd = super::pidfd_open(child).map_err(|e| e.errno);
    let _ = nix::sys::wait::waitpid(child, None);
    fd
}
