//! Processes in pid namespaces of their own, nested, which a restore must
//! make again with every pid at every level.
//!
//! `wl_pidns --ready FILE --verdict FILE [--unshare 1]`
//!
//! P, in the host's pid namespace, makes I1 with CLONE_NEWPID (pid 1 of
//! namespace A) and waits for SIGTERM, which it passes to I1, then waits
//! for I1's verdict (I1 may have been dumped on its own, so that it is not
//! P's child any more). I1 makes, in A: W (pid 2, leads its group, has a
//! thread T and a POSIX timer signalling T by its tid), W2 (joins W's
//! group), Z (exits at once with 7 and stays a zombie), and N, which makes
//! I2 with CLONE_NEWPID (pid 1 of namespace B), which makes X (calls
//! setsid). I1 holds a pidfd of W.
//!
//! Each child answers a query on its command pipe with its pid, parent,
//! group, session, NSpid line and pid namespace (and W its thread's tid,
//! the timer's hits and whether one hit another thread). On SIGTERM I1
//! asks again and checks that every id is what it was, that W2 is in W's
//! group, that the timer still hits T, that the pidfd names W (its
//! fdinfo's NSpid), that Z's status is still there to collect, and that
//! the namespaces group the processes as before.
//!
//! With `--unshare`, P also calls unshare(CLONE_NEWPID) once I1 exists:
//! its next child would be in a namespace none of its tasks is in, which
//! cryo refuses.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryo_tests::wl;

const NAME: &str = "wl_pidns";

static THREAD_TID: AtomicI32 = AtomicI32::new(0);
static HITS: AtomicU64 = AtomicU64::new(0);
static WRONG_THREAD: AtomicBool = AtomicBool::new(false);

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn gettid() -> i32 {
    // SAFETY: gettid takes no argument.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

extern "C" fn on_usr1(_sig: libc::c_int) {
    HITS.fetch_add(1, Ordering::SeqCst);
    if gettid() != THREAD_TID.load(Ordering::SeqCst) {
        WRONG_THREAD.store(true, Ordering::SeqCst);
    }
}

/// This process's ids as its namespace sees them, its NSpid line (cryo's
/// view first) and its pid namespace.
fn ids() -> String {
    // SAFETY: these calls take plain values and only return ids.
    let (pid, ppid, pgid, sid) = unsafe {
        (
            libc::getpid(),
            libc::getppid(),
            libc::getpgid(0),
            libc::getsid(0),
        )
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("pid={pid} ppid={ppid} pgid={pgid} sid={sid} nspid={nspid} ns={ns}")
}

/// W's answer: its ids, its thread's tid, the timer's hits so far and
/// whether a hit landed in another thread.
fn w_ids() -> String {
    format!(
        "{} tid={} hits={} wrong={}",
        ids(),
        THREAD_TID.load(Ordering::SeqCst),
        HITS.load(Ordering::SeqCst),
        WRONG_THREAD.load(Ordering::SeqCst)
    )
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("")
}

/// fork(); the child runs `before`, then serves on `cmd`.
fn fork_serving(
    cmd: i32,
    back: i32,
    ends: &[i32],
    before: impl FnOnce(),
    line: fn() -> String,
) -> Result<i32, String> {
    // SAFETY: fork of a single-threaded process; the child runs `before`
    // and serves, never returning.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        before();
        wl::serve(cmd, back, ends, line)
    }
    if pid < 0 {
        return Err(os_err("fork"));
    }
    Ok(pid)
}

/// W's setup: its own group, thread T (which keeps its tid where the
/// handler sees it) and a timer signalling T every 2 ms.
fn w_setup() {
    // SAFETY: setpgid(0, 0) makes this process a group leader.
    unsafe { libc::setpgid(0, 0) };
    // SAFETY: sigaction is plain data; the handler is async-signal-safe.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut());
    }
    std::thread::spawn(|| loop {
        THREAD_TID.store(gettid(), Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1));
    });
    while THREAD_TID.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: sigevent is plain data; timer_create and timer_settime read
    // and write live locals.
    unsafe {
        let mut sev: libc::sigevent = std::mem::zeroed();
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = libc::SIGUSR1;
        sev.sigev_notify_thread_id = THREAD_TID.load(Ordering::SeqCst);
        let mut id: libc::timer_t = std::mem::zeroed();
        if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) != 0 {
            libc::_exit(3);
        }
        let every = libc::timespec {
            tv_sec: 0,
            tv_nsec: 2_000_000,
        };
        let spec = libc::itimerspec {
            it_interval: every,
            it_value: every,
        };
        libc::timer_settime(id, 0, &spec, std::ptr::null_mut());
    }
}

/// The pid of the process a pidfd names, as this namespace sees it (the
/// last NSpid number of its fdinfo).
fn pidfd_target(fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last().map(str::to_string))
        .unwrap_or_default()
}

/// The children I1 asks, with their command pipes.
struct Kids {
    names: [&'static str; 5],
    cmds: [i32; 5],
    back: i32,
}

impl Kids {
    fn ask_all(&self) -> Vec<String> {
        self.cmds
            .iter()
            .map(|&c| {
                wl::write_fd(c, b"?");
                wl::read_line(self.back)
            })
            .collect()
    }
}

/// I1: pid 1 of namespace A; everything above, its verdict at the end.
fn init_a(a: &wl::Args) -> Result<Vec<String>, String> {
    let (to_w, to_w2, to_n, to_i2, to_x, back) = (
        wl::pipe()?,
        wl::pipe()?,
        wl::pipe()?,
        wl::pipe()?,
        wl::pipe()?,
        wl::pipe()?,
    );
    let ends = [to_w[1], to_w2[1], to_n[1], to_i2[1], to_x[1]];
    let w = fork_serving(to_w[0], back[1], &ends, w_setup, w_ids)?;
    // W's group exists before W2 joins it (W makes it too).
    // SAFETY: setpgid of our own child.
    unsafe { libc::setpgid(w, w) };
    let w2 = fork_serving(
        to_w2[0],
        back[1],
        &ends,
        // SAFETY: joining W's group, in our session.
        move || unsafe {
            libc::setpgid(0, w);
        },
        ids,
    )?;
    // SAFETY: fork; the child exits at once with 7 and stays a zombie.
    let z = unsafe { libc::fork() };
    if z == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(7) };
    }
    // Until Z has exited (its status left to collect).
    // SAFETY: siginfo_t is plain data; waitid writes it.
    unsafe {
        let mut si: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            z as libc::id_t,
            &mut si,
            libc::WEXITED | libc::WNOWAIT,
        );
    }
    let n = fork_serving(
        to_n[0],
        back[1],
        &ends,
        move || {
            // I2: pid 1 of namespace B, which makes X.
            match wl::clone_sharing(libc::CLONE_NEWPID as u64) {
                Ok(0) => {
                    let x = fork_serving(
                        to_x[0],
                        back[1],
                        &ends,
                        // SAFETY: X leads a session of its own.
                        || unsafe {
                            libc::setsid();
                        },
                        ids,
                    );
                    if x.is_err() {
                        // SAFETY: ends the child at once.
                        unsafe { libc::_exit(4) };
                    }
                    wl::serve(to_i2[0], back[1], &ends, ids)
                }
                Ok(_) => {}
                // SAFETY: ends the child at once.
                Err(_) => unsafe { libc::_exit(5) },
            }
        },
        ids,
    )?;
    // SAFETY: pidfd_open takes a pid and flags.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, w, 0) } as i32;
    if pidfd < 0 {
        return Err(os_err("pidfd_open"));
    }
    let kids = Kids {
        names: ["W", "W2", "N", "I2", "X"],
        cmds: ends,
        back: back[0],
    };
    let before = kids.ask_all();
    // Let the timer hit a few times before the dump.
    std::thread::sleep(Duration::from_millis(20));
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let after = kids.ask_all();
    let mut fails = Vec::new();
    let me = ids();
    if field(&me, "pid") != "1" || field(&me, "ppid") != "0" {
        fails.push(format!("I1 is not its namespace's init: {me}"));
    }
    for (i, name) in kids.names.iter().enumerate() {
        let (b, f) = (&before[i], &after[i]);
        if [b, f].iter().any(|l| {
            ["pid", "nspid", "ns"]
                .iter()
                .any(|k| field(l, k).is_empty())
        }) {
            fails.push(format!("{name} answered {b:?}, then {f:?}"));
        }
        for key in ["pid", "ppid", "pgid", "sid", "nspid", "tid"] {
            if field(b, key) != field(f, key) {
                fails.push(format!("{name}'s {key} was {b:?}, is {f:?}"));
            }
        }
    }
    let (wa, w2a, na, i2a, xa) = (&after[0], &after[1], &after[2], &after[3], &after[4]);
    if field(w2a, "pgid") != w.to_string() || field(wa, "pgid") != w.to_string() {
        fails.push(format!("W2 is not in W's group {w}: {w2a}"));
    }
    if field(i2a, "pid") != "1" || field(xa, "ppid") != "1" || field(xa, "sid") != "2" {
        fails.push(format!("namespace B: I2 {i2a}, X {xa}"));
    }
    let hits = |l: &str| field(l, "hits").parse::<u64>().unwrap_or(0);
    if hits(wa) <= hits(&before[0]) || field(wa, "wrong") != "false" {
        fails.push(format!(
            "W's timer: {} hits before, now {wa}",
            hits(&before[0])
        ));
    }
    let ns_a = field(&me, "ns").to_string();
    let in_a = [wa, w2a, na].iter().all(|l| field(l, "ns") == ns_a);
    let ns_b = field(i2a, "ns");
    if !in_a || ns_b == ns_a || field(xa, "ns") != ns_b {
        fails.push(format!(
            "namespaces: I1 {ns_a}, W {}, W2 {}, N {}, I2 {ns_b}, X {}",
            field(wa, "ns"),
            field(w2a, "ns"),
            field(na, "ns"),
            field(xa, "ns")
        ));
    }
    if pidfd_target(pidfd) != w.to_string() {
        fails.push(format!(
            "the pidfd names pid {:?}, not W ({w})",
            pidfd_target(pidfd)
        ));
    }
    // SAFETY: collecting our zombie child Z by its pid.
    let (got, status) = unsafe {
        let mut st = 0;
        (libc::waitpid(z, &mut st, libc::WNOHANG), st)
    };
    if got != z || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 7 {
        fails.push(format!("Z ({z}): waitpid gave {got}, status {status:#x}"));
    }
    // SAFETY: closing our command pipes ends the children, whom we wait for.
    unsafe {
        for fd in ends {
            libc::close(fd);
        }
        for p in [w, w2, n] {
            libc::waitpid(p, std::ptr::null_mut(), 0);
        }
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_pidns --ready FILE --verdict FILE [--unshare 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    if let Err(e) = wl::install_term_handler() {
        wl::finish(NAME, &a.verdict, Err(e));
    }
    let i1 = match wl::clone_sharing(libc::CLONE_NEWPID as u64) {
        Ok(0) => {
            let result = init_a(&a);
            wl::finish(NAME, &a.verdict, result)
        }
        Ok(pid) => pid,
        Err(e) => wl::finish(NAME, &a.verdict, Err(e)),
    };
    // SAFETY: unshare takes a flag; it only changes where our next child goes.
    if a.get("unshare") == Some("1") && unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        wl::log(NAME, &os_err("unshare(CLONE_NEWPID)"));
    }
    // P: collect what ends (I1 killed by a dump of its own), pass SIGTERM
    // on, then wait for I1's verdict.
    while !wl::TERM.load(Ordering::SeqCst) {
        // SAFETY: collecting any child of ours that ended, without blocking.
        unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill by I1's explicit pid.
    unsafe { libc::kill(i1, libc::SIGTERM) };
    let start = Instant::now();
    while !a.verdict.exists() && start.elapsed() < Duration::from_secs(30) {
        // SAFETY: as above.
        unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: collecting I1 if it is still our child.
    unsafe { libc::waitpid(i1, std::ptr::null_mut(), 0) };
    std::process::exit(0);
}
