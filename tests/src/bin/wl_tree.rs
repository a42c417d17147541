//! A process tree that checks its own shape after a restore.
//!
//! `wl_tree --ready FILE --verdict FILE`
//!
//! The root (a child subreaper) makes:
//! - `sess`: calls setsid (a session leader) and has a child `sess-kid`
//!   in its session;
//! - `group`: leads its own process group, with a child `group-kid` in it;
//! - `parent`: has a zombie child (exited with code 42) it has not
//!   collected;
//! - a zombie child of its own (exited with code 7) and one killed by
//!   SIGUSR2;
//! - `orphan-s`: its session's leader made it and exited (it was
//!   reparented to the root);
//! - `orphan-g`: its process group's leader made it and exited;
//! - `threaded`: a child with a second thread.
//!
//! Every live process remembers its pid, parent, group and session. On
//! SIGTERM the root passes SIGTERM on; each child checks itself (and
//! `parent` collects its zombie and checks the status), writes
//! VERDICT.<name> and exits; the root collects them all, its own zombies
//! included, and writes the verdict.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cryo_tests::wl;

const NAME: &str = "wl_tree";

/// Memory every process of the tree shares: a MAP_SHARED anonymous
/// region and a MAP_SHARED mapping of a file, both made by the root
/// before it forks (one u64 slot per child), and a private buffer the
/// children inherit copy-on-write and never write.
static SHM: AtomicUsize = AtomicUsize::new(0);
static SHF: AtomicUsize = AtomicUsize::new(0);
static COW: AtomicUsize = AtomicUsize::new(0);
const SHARED_LEN: usize = 64 * 1024;
const COW_LEN: usize = 4 << 20;
const CHILDREN: [&str; 8] = [
    "sess",
    "sess-kid",
    "group",
    "group-kid",
    "parent",
    "orphan-s",
    "orphan-g",
    "threaded",
];

fn slot(region: &AtomicUsize, i: usize) -> *mut u64 {
    (region.load(Ordering::SeqCst) as *mut u64).wrapping_add(i)
}

fn cow_pattern(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x00c0_ffee
}

/// The private buffer still holds its pattern.
fn check_cow(who: &str, fails: &mut Vec<String>) {
    let p = COW.load(Ordering::SeqCst) as *const u64;
    for i in (0..COW_LEN / 8).step_by(509) {
        // SAFETY: COW points to COW_LEN bytes mapped by the root before
        // any fork; i < COW_LEN / 8.
        let v = unsafe { std::ptr::read_volatile(p.add(i)) };
        if v != cow_pattern(i) {
            fails.push(format!("{who}: private buffer word {i} is {v:#x}"));
            return;
        }
    }
}

/// A child's side of the shared memory check: the root has written the
/// same nonzero token into slot 0 of both regions after the restore; the
/// child must see it in both, then acknowledges in its own slot.
fn check_shared(who: &str, fails: &mut Vec<String>) {
    let k = CHILDREN.iter().position(|c| *c == who).unwrap_or(0) + 1;
    // SAFETY: slot 0 and slot k lie in the SHARED_LEN-byte regions the
    // root mapped before forking (k <= 8); u64-aligned.
    unsafe {
        let a = std::ptr::read_volatile(slot(&SHM, 0));
        let b = std::ptr::read_volatile(slot(&SHF, 0));
        if a == 0 || a != b {
            fails.push(format!(
                "{who}: shared anonymous memory says {a:#x}, the shared file mapping {b:#x} (not shared with the root any more?)"
            ));
        }
        std::ptr::write_volatile(slot(&SHM, k), a.wrapping_add(k as u64));
        std::ptr::write_volatile(slot(&SHF, k), b.wrapping_add(k as u64));
    }
}

fn map_shared(dir: &Path) -> Result<(), String> {
    // SAFETY: a fresh anonymous shared mapping; the kernel picks the place.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SHARED_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if a == libc::MAP_FAILED {
        return Err("mmap shared anonymous".into());
    }
    let path = dir.join("shared-file");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(SHARED_LEN as u64)
        .map_err(|e| format!("set_len: {e}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: maps the file we just sized; the descriptor is closed after
    // (the mapping keeps the file).
    let b = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SHARED_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if b == libc::MAP_FAILED {
        return Err("mmap shared file".into());
    }
    drop(f);
    let mut cow = vec![0u64; COW_LEN / 8];
    for (i, w) in cow.iter_mut().enumerate() {
        *w = cow_pattern(i);
    }
    COW.store(
        Box::leak(cow.into_boxed_slice()).as_ptr() as usize,
        Ordering::SeqCst,
    );
    SHM.store(a as usize, Ordering::SeqCst);
    SHF.store(b as usize, Ordering::SeqCst);
    Ok(())
}

/// The ids a process had at setup.
#[derive(Clone, Copy, Debug)]
struct Ids {
    pid: i32,
    ppid: i32,
    pgid: i32,
    sid: i32,
}

fn ids_now() -> Ids {
    // SAFETY: these calls have no arguments beyond 0 (self) and cannot fail
    // for the calling process.
    unsafe {
        Ids {
            pid: libc::getpid(),
            ppid: libc::getppid(),
            pgid: libc::getpgid(0),
            sid: libc::getsid(0),
        }
    }
}

fn check_ids(who: &str, was: Ids, fails: &mut Vec<String>) {
    let now = ids_now();
    if now.pid != was.pid || now.ppid != was.ppid || now.pgid != was.pgid || now.sid != was.sid {
        fails.push(format!("{who}: ids {now:?}, were {was:?}"));
    }
}

fn fork() -> i32 {
    // SAFETY: the workload is single-threaded when it forks (the one
    // extra thread is made later, in `threaded` only); the child only
    // runs this program's own code.
    unsafe { libc::fork() }
}

fn wait_term() {
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child's life: set up, say ready, wait for SIGTERM, check, write its
/// verdict file, exit 0 (PASS) or 1.
fn child(name: &str, dir: &Path, check: impl FnOnce(&mut Vec<String>)) -> ! {
    child_of(name, dir, None, check)
}

/// As [`child`], for a child whose parent will change before the dump (it
/// is to be reparented to `ppid`).
fn child_of(name: &str, dir: &Path, ppid: Option<i32>, check: impl FnOnce(&mut Vec<String>)) -> ! {
    let mut ids = ids_now();
    if let Some(p) = ppid {
        ids.ppid = p;
    }
    let _ = wl::write_atomic(&dir.join(format!("ready.{name}")), b"ready\n");
    wait_term();
    let mut fails = Vec::new();
    check_ids(name, ids, &mut fails);
    check_cow(name, &mut fails);
    check_shared(name, &mut fails);
    check(&mut fails);
    let text = if fails.is_empty() {
        "PASS\n".to_string()
    } else {
        fails.iter().map(|f| format!("FAIL: {f}\n")).collect()
    };
    let _ = wl::write_atomic(&dir.join(format!("verdict.{name}")), text.as_bytes());
    // SAFETY: _exit ends the child without running the parent's atexit
    // handlers.
    unsafe { libc::_exit(if fails.is_empty() { 0 } else { 1 }) }
}

fn wait_for(pid: i32) -> Option<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Some(status);
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

struct Kids {
    /// name, pid, and whether its verdict file is expected.
    live: Vec<(String, i32)>,
    zombie_code: i32,
    zombie_sig: i32,
}

/// Fork a child that runs `f` (which never returns: it ends in `_exit`)
/// and wait for its ready file.
fn spawn(name: &str, dir: &Path, f: impl FnOnce()) -> Result<i32, String> {
    match fork() {
        0 => {
            f();
            exit_now(3)
        }
        p if p > 0 => {
            let ready = dir.join(format!("ready.{name}"));
            let start = Instant::now();
            while !ready.exists() {
                if start.elapsed() > Duration::from_secs(10) {
                    return Err(format!("{name} not ready"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(p)
        }
        _ => Err(format!("fork {name}: {}", std::io::Error::last_os_error())),
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit without running atexit handlers.
    unsafe { libc::_exit(code) }
}

fn setup(dir: &Path) -> Result<Kids, String> {
    // SAFETY: prctl with integer arguments on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err("PR_SET_CHILD_SUBREAPER".into());
    }
    let mut live = Vec::new();
    let root = std::process::id() as i32;
    // A session leader and a group leader, each with a child of its own
    // in its session or group.
    for (name, kid_name, session) in [("sess", "sess-kid", true), ("group", "group-kid", false)] {
        let d = dir.to_path_buf();
        let pid = spawn(name, dir, move || {
            // SAFETY: setsid / setpgid on ourselves in a fresh child (not
            // a group leader yet).
            unsafe {
                if session {
                    libc::setsid();
                } else {
                    libc::setpgid(0, 0);
                }
            }
            let d2 = d.clone();
            let kid = spawn(kid_name, &d, move || child(kid_name, &d2, |_| {})).unwrap_or(-1);
            child(name, &d, move |fails| {
                // SAFETY: kill of our own child.
                unsafe { libc::kill(kid, libc::SIGTERM) };
                match wait_for(kid) {
                    Some(0) => {}
                    s => fails.push(format!("{name}: {kid_name} ended with {s:?}")),
                }
            })
        })?;
        live.push((name.to_string(), pid));
    }
    let d = dir.to_path_buf();
    let parent = spawn("parent", dir, move || {
        let z = fork();
        if z == 0 {
            exit_now(42);
        }
        // Wait until it is a zombie, without collecting it.
        wait_zombie(z);
        child("parent", &d, move |fails| match wait_for(z) {
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 42 => {}
            s => fails.push(format!("parent: its zombie {z} gave status {s:?}")),
        })
    })?;
    live.push(("parent".to_string(), parent));
    // Orphans: a session leader (and a group leader) that made a child and
    // exited; the child was reparented to us.
    for (name, session) in [("orphan-s", true), ("orphan-g", false)] {
        let d = dir.to_path_buf();
        let name_s = name.to_string();
        let leader = fork();
        if leader == 0 {
            // SAFETY: setsid / setpgid on ourselves in a fresh child.
            unsafe {
                if session {
                    libc::setsid();
                } else {
                    libc::setpgid(0, 0);
                }
            }
            let _ = spawn(&name_s, &d, {
                let d = d.clone();
                let n = name_s.clone();
                move || child_of(&n, &d, Some(root), |_| {})
            });
            exit_now(0);
        }
        if leader < 0 {
            return Err("fork".into());
        }
        wait_for(leader);
        let ready = dir.join(format!("ready.{name}"));
        if !ready.exists() {
            return Err(format!("{name} not ready"));
        }
        let orphan = std::fs::read_dir("/proc/self/task")
            .ok()
            .and_then(|_| find_child_with_sid_or_pgid(leader))
            .ok_or(format!("{name}: not reparented to the root"))?;
        live.push((name.to_string(), orphan));
    }
    let d = dir.to_path_buf();
    let threaded = spawn("threaded", dir, move || {
        let t = std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(7));
        });
        std::mem::forget(t);
        child("threaded", &d, |fails| {
            let n = std::fs::read_dir("/proc/self/task")
                .map(|d| d.count())
                .unwrap_or(0);
            if n != 2 {
                fails.push(format!("threaded: {n} threads, expected 2"));
            }
        })
    })?;
    live.push(("threaded".to_string(), threaded));
    // Our own zombies: one exited with 7, one killed by SIGUSR2.
    let zombie_code = fork();
    if zombie_code == 0 {
        exit_now(7);
    }
    let zombie_sig = fork();
    if zombie_sig == 0 {
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    // SAFETY: kill of our own child.
    unsafe { libc::kill(zombie_sig, libc::SIGUSR2) };
    for z in [zombie_code, zombie_sig] {
        wait_zombie(z);
    }
    Ok(Kids {
        live,
        zombie_code,
        zombie_sig,
    })
}

/// Wait until child `z` is a zombie, without collecting it.
fn wait_zombie(z: i32) {
    loop {
        let st = std::fs::read_to_string(format!("/proc/{z}/stat")).unwrap_or_default();
        if st
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Our child whose session or group is `leader` (the orphan it left).
fn find_child_with_sid_or_pgid(leader: i32) -> Option<i32> {
    let me = std::process::id();
    let kids = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).ok()?;
    kids.split_whitespace()
        .filter_map(|k| k.parse::<i32>().ok())
        .find(|&k| {
            // SAFETY: plain queries on another process by pid.
            unsafe { libc::getsid(k) == leader || libc::getpgid(k) == leader }
        })
}

fn run(ready: &Path, verdict: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let dir = verdict
        .parent()
        .ok_or("verdict has no directory")?
        .join("tree");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir: {e}"))?;
    map_shared(&dir)?;
    let kids = setup(&dir)?;
    let ids = ids_now();
    wl::log(
        NAME,
        &format!(
            "ready: {:?} zombies {} {}",
            kids.live, kids.zombie_code, kids.zombie_sig
        ),
    );
    wl::write_atomic(ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    wait_term();
    let mut fails = Vec::new();
    check_ids(NAME, ids, &mut fails);
    check_cow(NAME, &mut fails);
    // A token only this run of the root knows, into both shared regions.
    let token = 0x5eed_0000_0000_0000u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    // SAFETY: slot 0 of the two regions mapped by map_shared.
    unsafe {
        std::ptr::write_volatile(slot(&SHM, 0), token);
        std::ptr::write_volatile(slot(&SHF, 0), token);
    }
    for (name, pid) in &kids.live {
        // SAFETY: kill of our own child.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
        match wait_for(*pid) {
            Some(0) => {}
            s => fails.push(format!("{name} (pid {pid}) ended with {s:?}")),
        }
    }
    for name in [
        "sess",
        "sess-kid",
        "group",
        "group-kid",
        "parent",
        "orphan-s",
        "orphan-g",
        "threaded",
    ] {
        let text = std::fs::read_to_string(dir.join(format!("verdict.{name}")))
            .unwrap_or_else(|_| format!("FAIL: {name} wrote no verdict\n"));
        fails.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("FAIL: "))
                .map(String::from),
        );
    }
    // Every child saw the token and acknowledged in its own slot.
    for (k, name) in CHILDREN.iter().enumerate() {
        // SAFETY: slots 1..=8 of the two regions mapped by map_shared.
        let (a, b) = unsafe {
            (
                std::ptr::read_volatile(slot(&SHM, k + 1)),
                std::ptr::read_volatile(slot(&SHF, k + 1)),
            )
        };
        let want = token.wrapping_add(k as u64 + 1);
        if a != want || b != want {
            fails.push(format!(
                "{name}'s acknowledgement reads {a:#x} (shared anonymous) and {b:#x} (shared file), expected {want:#x}"
            ));
        }
    }
    match wait_for(kids.zombie_code) {
        Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 7 => {}
        s => fails.push(format!("zombie {} gave status {s:?}", kids.zombie_code)),
    }
    match wait_for(kids.zombie_sig) {
        Some(s) if libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGUSR2 => {}
        s => fails.push(format!("zombie {} gave status {s:?}", kids.zombie_sig)),
    }
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse("wl_tree --ready FILE --verdict FILE");
    wl::close_extra_fds();
    let result = run(&a.ready, &a.verdict);
    wl::finish(NAME, &a.verdict, result);
}
