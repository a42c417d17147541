//! A multi-threaded workload that checks its own threads after a restore.
//!
//! `wl_threads --ready FILE --verdict FILE [--spinners N]`
//!
//! Besides the main thread it runs:
//! - `waiter`: blocked on a condition variable (a futex wait) until the
//!   main thread wakes it for the check;
//! - `sleeper`: a loop of 5 ms sleeps, counting;
//! - `spinner-K` (N of them, default 1): spins in user space without any
//!   syscall, with a pattern held in xmm9 across the whole spin and
//!   compared with a general register copy on every round.
//!
//! Each thread sets its own name, signal mask, TLS value and scheduling
//! state (policy, real-time priority, nice value, CPU affinity, timer
//! slack: different in every thread) at start, and the process its
//! oom_score_adj, PR_SET_THP_DISABLE and its membarrier registrations; the
//! sleeper also has a sigaltstack, a SIGUSR1 queued to it alone (blocked
//! in that thread only) and a POSIX timer that signals it alone
//! (SIGEV_THREAD_ID). Once ready, it waits for SIGTERM. Then every
//! thread checks, by itself, that it still has its tid, name, mask, TLS
//! value, robust list head, rseq registration (the kernel updates its cpu
//! id again), scheduling state, altstack and pending signal; the sleeper and spinners that
//! they made progress since; and the main thread joins them all (which
//! needs the clear-child-tid address each thread had). The verdict lists
//! every failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_threads";
const MEMBARRIER_PRIVATE_EXPEDITED: i32 = 1 << 3;
const MEMBARRIER_PRIVATE_EXPEDITED_RSEQ: i32 = 1 << 7;

/// membarrier(cmd, 0, 0).
fn membarrier(cmd: i32) -> i64 {
    // SAFETY: membarrier takes integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) }
}

/// What the process sets its /proc/self/oom_score_adj to.
const OOM_SCORE_ADJ: i32 = 345;

struct Shared {
    /// Set by the main thread once SIGTERM came: threads check themselves.
    check: AtomicBool,
    /// The waiter's condition.
    cond: (Mutex<bool>, Condvar),
    fails: Mutex<Vec<String>>,
    sleeper_count: AtomicU64,
    spin_rounds: Vec<AtomicU64>,
    /// Threads that finished their setup.
    ready: AtomicU64,
    /// The CPUs the process could run on at start.
    cpus: Vec<usize>,
}

impl Shared {
    fn fail(&self, who: &str, what: String) {
        wl::log(NAME, &format!("{who}: FAIL {what}"));
        if let Ok(mut f) = self.fails.lock() {
            f.push(format!("{who}: {what}"));
        }
    }
}

thread_local! {
    static TLS_VALUE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn set_name(name: &str) {
    let mut b = [0u8; 16];
    b[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from a buffer we own.
    unsafe { libc::prctl(libc::PR_SET_NAME, b.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t owned here.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: as above; s is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

fn block(sigs: &[i32]) {
    let set = sigset(sigs);
    // SAFETY: set is initialised; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn blocked(sig: i32) -> bool {
    // SAFETY: plain data, filled by pthread_sigmask.
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: reading this thread's mask into `cur`.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) };
    // SAFETY: cur is an initialised sigset_t.
    unsafe { libc::sigismember(&cur, sig) == 1 }
}

fn pending(sig: i32) -> bool {
    // SAFETY: plain data, filled by sigpending.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigpending writes this thread's (and the process's) pending set.
    unsafe { libc::sigpending(&mut set) };
    // SAFETY: set is an initialised sigset_t.
    unsafe { libc::sigismember(&set, sig) == 1 }
}

fn robust_head() -> u64 {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list(0) writes this thread's head and length into
    // the two locals.
    unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    head
}

extern "C" {
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

/// This thread's rseq area (glibc registers one per thread), if any.
fn rseq_area() -> Option<*mut u32> {
    // SAFETY: plain statics glibc exports.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return None;
    }
    let tp: u64;
    // SAFETY: reading fs:0, the thread pointer glibc keeps there.
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp) };
    Some((tp as i64 + off as i64) as *mut u32)
}

/// Whether the kernel still updates this thread's rseq area: spoil its
/// cpu_id, sleep (the kernel writes it again on the way back to user
/// space when the thread is registered), read it back.
fn rseq_alive() -> Result<(), String> {
    let Some(area) = rseq_area() else {
        return Ok(()); // glibc without rseq: nothing to check
    };
    // SAFETY: cpu_id is the u32 at offset 4 of this thread's rseq area,
    // which lives in its TLS block and is only written by the kernel and us.
    let cpu = unsafe { area.add(1) };
    for _ in 0..20 {
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(cpu, 0xdead_0000) };
        std::thread::sleep(Duration::from_millis(2));
        // SAFETY: as above.
        let v = unsafe { std::ptr::read_volatile(cpu) };
        if v != 0xdead_0000 {
            return if v < 4096 {
                Ok(())
            } else {
                Err(format!("rseq cpu_id is {v:#x}"))
            };
        }
    }
    Err("the kernel no longer updates the rseq area (not registered)".into())
}

/// The checks every thread runs on itself.
struct Own {
    who: String,
    tid: i32,
    name: String,
    tls: u64,
    robust: u64,
    blocked: Vec<i32>,
    sched: Sched,
    /// What went wrong giving the thread its scheduling state.
    sched_setup: Option<String>,
}

/// How a thread has itself scheduled (each thread its own), checked by
/// the thread after the restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sched {
    policy: i32,
    reset_on_fork: bool,
    priority: i32,
    nice: i32,
    /// Bound to this one CPU, or to every CPU the process had at start.
    cpu: Option<usize>,
    slack_ns: u64,
}

/// The CPUs this process may run on.
fn cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set with an index below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

impl Sched {
    /// Give the calling thread this state.
    fn apply(&self) -> Result<(), String> {
        let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        // SAFETY: setpriority on the calling thread (who 0) with integers.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, self.nice) } != 0 {
            return Err(err("setpriority"));
        }
        let param = libc::sched_param {
            sched_priority: self.priority,
        };
        let policy = self.policy
            | if self.reset_on_fork {
                libc::SCHED_RESET_ON_FORK
            } else {
                0
            };
        // SAFETY: `param` is a live sched_param; pid 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            return Err(err("sched_setscheduler"));
        }
        if let Some(cpu) = self.cpu {
            // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it
            // (cpu < CPU_SETSIZE, from cpus()); the set outlives the call.
            let r = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            if r != 0 {
                return Err(err("sched_setaffinity"));
            }
        }
        // A real-time thread has no timer slack (the kernel keeps it 0).
        let rt = self.policy == libc::SCHED_FIFO || self.policy == libc::SCHED_RR;
        if !rt
            // SAFETY: prctl with integer arguments on the calling thread.
            && unsafe {
                libc::prctl(
                    libc::PR_SET_TIMERSLACK,
                    self.slack_ns as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            } != 0
        {
            return Err(err("PR_SET_TIMERSLACK"));
        }
        Ok(())
    }

    /// The calling thread's state, as `self` describes it.
    fn now(&self, all: &[usize]) -> Sched {
        // SAFETY: sched_getscheduler, sched_getparam, getpriority and
        // prctl(PR_GET_TIMERSLACK) on the calling thread, writing only into
        // the live local `param`.
        let (raw, param, nice, slack) = unsafe {
            let mut param = libc::sched_param { sched_priority: -1 };
            let raw = libc::sched_getscheduler(0);
            libc::sched_getparam(0, &mut param);
            let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
            let slack = libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0);
            (raw, param, nice, slack)
        };
        let mine = cpus();
        let cpu = match mine.as_slice() {
            [c] if self.cpu == Some(*c) => Some(*c),
            m if m == all => None,
            // Neither: a value that differs from what was set.
            _ => Some(usize::MAX),
        };
        Sched {
            policy: raw & !libc::SCHED_RESET_ON_FORK,
            reset_on_fork: raw & libc::SCHED_RESET_ON_FORK != 0,
            priority: param.sched_priority,
            nice,
            cpu,
            slack_ns: slack as u64,
        }
    }
}

impl Own {
    fn setup(who: &str, tls: u64, blocked: &[i32], sched: Sched) -> Own {
        set_name(who);
        TLS_VALUE.with(|v| v.set(tls));
        block(blocked);
        let sched_setup = sched.apply().err();
        Own {
            who: who.to_string(),
            tid: gettid(),
            name: who.chars().take(15).collect(),
            tls,
            robust: robust_head(),
            blocked: blocked.to_vec(),
            sched,
            sched_setup,
        }
    }

    fn check(&self, sh: &Shared) {
        let who = &self.who;
        let tid = gettid();
        if tid != self.tid {
            sh.fail(who, format!("tid is {tid}, was {}", self.tid));
        }
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_string();
        if comm != self.name {
            sh.fail(who, format!("name is {comm:?}, was {:?}", self.name));
        }
        let tls = TLS_VALUE.with(|v| v.get());
        if tls != self.tls {
            sh.fail(who, format!("TLS value {tls:#x}, was {:#x}", self.tls));
        }
        let robust = robust_head();
        if robust != self.robust {
            sh.fail(
                who,
                format!("robust list {robust:#x}, was {:#x}", self.robust),
            );
        }
        for s in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGHUP, libc::SIGWINCH] {
            if blocked(s) != self.blocked.contains(&s) {
                sh.fail(
                    who,
                    format!(
                        "signal {s} is {}blocked",
                        if blocked(s) { "" } else { "not " }
                    ),
                );
            }
        }
        if let Err(e) = rseq_alive() {
            sh.fail(who, e);
        }
        if let Some(e) = &self.sched_setup {
            sh.fail(who, format!("setting its scheduling state failed: {e}"));
        } else {
            let now = self.sched.now(&sh.cpus);
            if now != self.sched {
                sh.fail(who, format!("scheduled as {now:?}, was {:?}", self.sched));
            }
        }
    }
}

fn waiter(sh: Arc<Shared>) {
    let sched = Sched {
        policy: libc::SCHED_BATCH,
        reset_on_fork: false,
        priority: 0,
        nice: 7,
        cpu: None,
        slack_ns: 200_001,
    };
    let own = Own::setup("waiter", 0x1111_2222_3333_4444, &[libc::SIGHUP], sched);
    sh.ready.fetch_add(1, Ordering::SeqCst);
    let (m, cv) = &sh.cond;
    let mut woke = match m.lock() {
        Ok(g) => g,
        Err(_) => return sh.fail("waiter", "mutex poisoned".into()),
    };
    while !*woke {
        woke = match cv.wait(woke) {
            Ok(g) => g,
            Err(_) => return sh.fail("waiter", "mutex poisoned".into()),
        };
    }
    drop(woke);
    own.check(&sh);
}

const ALT_SIZE: usize = 64 * 1024;

/// The interval and first expiry of the sleeper's thread timer, in seconds.
const TIMER_INTERVAL: i64 = 600;
const TIMER_VALUE: i64 = 900;

/// A CLOCK_MONOTONIC timer whose expiry sends SIGRTMIN+2 to thread `tid`
/// alone (SIGEV_THREAD_ID), armed for TIMER_VALUE s, then every
/// TIMER_INTERVAL s.
fn thread_timer(tid: i32) -> Result<libc::timer_t, String> {
    // SAFETY: sigevent is plain data; every field used is set below.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_THREAD_ID;
    sev.sigev_signo = libc::SIGRTMIN() + 2;
    sev.sigev_notify_thread_id = tid;
    sev.sigev_value = libc::sigval {
        sival_ptr: 0x7111_2222 as *mut libc::c_void,
    };
    let mut t: libc::timer_t = std::ptr::null_mut();
    // SAFETY: sev is initialised, t is a valid out pointer.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut t) } != 0 {
        return Err(format!(
            "timer_create(SIGEV_THREAD_ID): {}",
            std::io::Error::last_os_error()
        ));
    }
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: TIMER_INTERVAL,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: TIMER_VALUE,
            tv_nsec: 0,
        },
    };
    // SAFETY: t was returned by timer_create; spec is initialised.
    if unsafe { libc::timer_settime(t, 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "timer_settime: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(t)
}

/// The thread timer still counts down from TIMER_VALUE with its interval,
/// and /proc/self/timers still says it signals this thread.
fn check_thread_timer(t: libc::timer_t) -> Result<(), String> {
    // SAFETY: itimerspec is plain data; timer_gettime fills it.
    let mut v: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: t was returned by timer_create; v is a valid out pointer.
    if unsafe { libc::timer_gettime(t, &mut v) } != 0 {
        return Err(format!(
            "timer_gettime of the thread timer: {}",
            std::io::Error::last_os_error()
        ));
    }
    let value = (v.it_value.tv_sec, v.it_value.tv_nsec);
    if v.it_interval.tv_sec != TIMER_INTERVAL || value <= (0, 0) || value > (TIMER_VALUE, 0) {
        return Err(format!(
            "thread timer: interval {:?} value {value:?}, expected {TIMER_INTERVAL} s and at most {TIMER_VALUE} s",
            (v.it_interval.tv_sec, v.it_interval.tv_nsec)
        ));
    }
    let text = std::fs::read_to_string("/proc/self/timers").unwrap_or_default();
    let want = format!("signal/tid.{}", gettid());
    if !text.contains(&want) {
        return Err(format!("/proc/self/timers does not name {want}:\n{text}"));
    }
    Ok(())
}

fn sleeper(sh: Arc<Shared>) {
    // Real-time, with the nice value it had before (kept under RR).
    let sched = Sched {
        policy: libc::SCHED_RR,
        reset_on_fork: true,
        priority: 7,
        nice: 5,
        cpu: sh.cpus.last().copied(),
        slack_ns: 0,
    };
    let own = Own::setup("sleeper", 0x5555_6666_7777_8888, &[libc::SIGUSR1], sched);
    // A POSIX timer that signals this thread alone (SIGEV_THREAD_ID).
    let timer = match thread_timer(gettid()) {
        Ok(t) => Some(t),
        Err(e) => {
            sh.fail("sleeper", e);
            None
        }
    };
    let alt = vec![0u8; ALT_SIZE].into_boxed_slice();
    let alt_sp = Box::leak(alt).as_mut_ptr() as u64;
    let ss = libc::stack_t {
        ss_sp: alt_sp as *mut libc::c_void,
        ss_flags: 0,
        ss_size: ALT_SIZE,
    };
    // SAFETY: the stack memory is leaked, so it stays valid for the
    // thread's life; the old stack is not wanted.
    unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
    // A signal for this thread alone, blocked here: it stays queued.
    // SAFETY: tgkill to our own thread with a valid signal.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), gettid(), libc::SIGUSR1) };
    sh.ready.fetch_add(1, Ordering::SeqCst);
    while !sh.check.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
        sh.sleeper_count.fetch_add(1, Ordering::SeqCst);
    }
    let at_check = sh.sleeper_count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(30));
    own.check(&sh);
    if let Some(t) = timer {
        if let Err(e) = check_thread_timer(t) {
            sh.fail("sleeper", e);
        }
    }
    // SAFETY: plain data, filled by sigaltstack.
    let mut cur: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: reading the current altstack into `cur`.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut cur) };
    if cur.ss_sp as u64 != alt_sp || cur.ss_size != ALT_SIZE {
        sh.fail(
            "sleeper",
            format!(
                "sigaltstack {:#x}+{:#x}, was {alt_sp:#x}+{ALT_SIZE:#x}",
                cur.ss_sp as u64, cur.ss_size
            ),
        );
    }
    if !pending(libc::SIGUSR1) {
        sh.fail(
            "sleeper",
            "its own queued SIGUSR1 is no longer pending".into(),
        );
    }
    if at_check == 0 {
        sh.fail("sleeper", "never counted".into());
    }
}

/// Spin `rounds` times comparing xmm9 with the pattern in a general
/// register; stop early when `stop` is set. Returns the rounds done, or
/// None if xmm9 lost the pattern.
fn spin(pattern: u64, rounds: u64, stop: &AtomicBool) -> Option<u64> {
    let done: u64;
    let bad: u64;
    // SAFETY: the asm only uses the declared registers (xmm9 is declared
    // clobbered) and reads the AtomicBool's byte; it makes no syscall and
    // does not touch the stack.
    unsafe {
        std::arch::asm!(
            "movq xmm9, {pat}",
            "xor {n}, {n}",
            "xor {bad}, {bad}",
            "2:",
            "movq {tmp}, xmm9",
            "cmp {tmp}, {pat}",
            "jne 3f",
            "add {n}, 1",
            "cmp {n}, {max}",
            "jae 4f",
            "cmp byte ptr [{stop}], 0",
            "je 2b",
            "jmp 4f",
            "3:",
            "mov {bad}, 1",
            "4:",
            pat = in(reg) pattern,
            max = in(reg) rounds,
            stop = in(reg) stop as *const AtomicBool,
            n = out(reg) done,
            bad = out(reg) bad,
            tmp = out(reg) _,
            out("xmm9") _,
            options(nostack),
        );
    }
    (bad == 0).then_some(done)
}

fn spinner(sh: Arc<Shared>, k: usize) {
    let who = format!("spinner-{k}");
    let pattern = 0x0123_4567_89ab_cdefu64 ^ ((k as u64) << 40);
    let sched = Sched {
        policy: libc::SCHED_OTHER,
        reset_on_fork: false,
        priority: 0,
        nice: 11,
        cpu: None,
        slack_ns: 77_001 + k as u64,
    };
    let own = Own::setup(
        &who,
        0x9999_0000_0000_0000 | k as u64,
        &[libc::SIGUSR2],
        sched,
    );
    sh.ready.fetch_add(1, Ordering::SeqCst);
    while !sh.check.load(Ordering::SeqCst) {
        match spin(pattern, 1 << 20, &sh.check) {
            Some(n) => {
                sh.spin_rounds[k].fetch_add(n, Ordering::SeqCst);
            }
            None => {
                sh.fail(&who, "xmm9 lost its value while spinning".into());
                break;
            }
        }
    }
    own.check(&sh);
    if sh.spin_rounds[k].load(Ordering::SeqCst) == 0 {
        sh.fail(&who, "never spun".into());
    }
}

fn run(spinners: usize, ready: &std::path::Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let sh = Arc::new(Shared {
        check: AtomicBool::new(false),
        cond: (Mutex::new(false), Condvar::new()),
        fails: Mutex::new(Vec::new()),
        sleeper_count: AtomicU64::new(0),
        spin_rounds: (0..spinners).map(|_| AtomicU64::new(0)).collect(),
        ready: AtomicU64::new(0),
        cpus: cpus(),
    });
    let mut handles = Vec::new();
    let s = sh.clone();
    handles.push(std::thread::spawn(move || waiter(s)));
    let s = sh.clone();
    handles.push(std::thread::spawn(move || sleeper(s)));
    for k in 0..spinners {
        let s = sh.clone();
        handles.push(std::thread::spawn(move || spinner(s, k)));
    }
    // After the spawns: threads inherit the creator's mask.
    let sched = Sched {
        policy: libc::SCHED_OTHER,
        reset_on_fork: false,
        priority: 0,
        nice: 3,
        cpu: sh.cpus.first().copied(),
        slack_ns: 123_457,
    };
    let main_own = Own::setup(NAME, 0xaaaa_bbbb_cccc_dddd, &[libc::SIGWINCH], sched);
    std::fs::write("/proc/self/oom_score_adj", OOM_SCORE_ADJ.to_string())
        .map_err(|e| format!("writing /proc/self/oom_score_adj: {e}"))?;
    // Private expedited membarrier, plain and for rseq: registered once,
    // usable until the process ends.
    let mut barriers = Vec::new();
    for cmd in [
        MEMBARRIER_PRIVATE_EXPEDITED,
        MEMBARRIER_PRIVATE_EXPEDITED_RSEQ,
    ] {
        if membarrier(cmd << 1) == 0 {
            barriers.push(cmd);
        } else if cmd == MEMBARRIER_PRIVATE_EXPEDITED {
            return Err(format!(
                "MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: prctl with integer arguments, for the whole process.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_THP_DISABLE: {}",
            std::io::Error::last_os_error()
        ));
    }
    let nthreads = 2 + spinners as u64;
    while sh.ready.load(Ordering::SeqCst) < nthreads {
        std::thread::sleep(Duration::from_millis(1));
    }
    let tids_before = task_list();
    wl::log(NAME, &format!("ready; threads {tids_before:?}"));
    wl::write_atomic(ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    let sleeper_before = loop {
        if wl::TERM.load(Ordering::SeqCst) {
            break sh.sleeper_count.load(Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let spins_before: Vec<u64> = sh
        .spin_rounds
        .iter()
        .map(|r| r.load(Ordering::SeqCst))
        .collect();
    wl::log(NAME, "SIGTERM: checking");
    // Let the sleeper and spinners show progress after the restore (give
    // them up to 5 s: a loaded machine may not run a spinner for a while).
    let progressed = |sh: &Shared| {
        sh.sleeper_count.load(Ordering::SeqCst) > sleeper_before
            && spins_before
                .iter()
                .enumerate()
                .all(|(k, b)| sh.spin_rounds[k].load(Ordering::SeqCst) > *b)
    };
    let t0 = std::time::Instant::now();
    while !progressed(&sh) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let tids_now = task_list();
    if tids_now != tids_before {
        sh.fail(
            NAME,
            format!("threads are {tids_now:?}, were {tids_before:?}"),
        );
    }
    if sh.sleeper_count.load(Ordering::SeqCst) <= sleeper_before {
        sh.fail(NAME, "the sleeper made no progress after SIGTERM".into());
    }
    for (k, before) in spins_before.iter().enumerate() {
        if sh.spin_rounds[k].load(Ordering::SeqCst) <= *before {
            sh.fail(
                &format!("spinner-{k}"),
                "made no progress after SIGTERM".into(),
            );
        }
    }
    main_own.check(&sh);
    let adj = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap_or_default();
    if adj.trim() != OOM_SCORE_ADJ.to_string() {
        sh.fail(
            NAME,
            format!("oom_score_adj is {}, was {OOM_SCORE_ADJ}", adj.trim()),
        );
    }
    for &cmd in &barriers {
        if membarrier(cmd) != 0 {
            sh.fail(
                NAME,
                format!(
                    "membarrier({cmd}) after its registration: {}",
                    std::io::Error::last_os_error()
                ),
            );
        }
    }
    // SAFETY: prctl with integer arguments.
    let thp_disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    if thp_disabled != 1 {
        sh.fail(NAME, format!("PR_GET_THP_DISABLE is {thp_disabled}, was 1"));
    }
    sh.check.store(true, Ordering::SeqCst);
    {
        let (m, cv) = &sh.cond;
        let mut g = m.lock().map_err(|_| "mutex poisoned")?;
        *g = true;
        cv.notify_all();
    }
    for h in handles {
        if h.join().is_err() {
            sh.fail(NAME, "a thread panicked".into());
        }
    }
    // A joined thread has cleared its tid but may still be leaving the
    // kernel: give it a moment to disappear from /proc.
    let t0 = std::time::Instant::now();
    let mut left = task_list();
    while left.len() != 1 && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
        left = task_list();
    }
    if left.len() != 1 {
        sh.fail(NAME, format!("threads left after join: {left:?}"));
    }
    let fails = sh.fails.lock().map_err(|_| "mutex poisoned")?.clone();
    Ok(fails)
}

/// The tids of this process, sorted.
fn task_list() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

fn main() {
    let a = wl::Args::parse("wl_threads --ready FILE --verdict FILE [--spinners N]");
    let spinners = a.get("spinners").and_then(|v| v.parse().ok()).unwrap_or(1);
    wl::close_extra_fds();
    let result = run(spinners, &a.ready);
    wl::finish(NAME, &a.verdict, result);
}
