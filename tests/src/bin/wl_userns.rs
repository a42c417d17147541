//! A container in a user namespace of its own, which owns the container's
//! other namespaces: a restore must make the user namespace again with
//! its maps and every other namespace owned by it.
//!
//! `wl_userns --ready FILE --verdict FILE --tmp DIR [--pidns 0] [--map 0] [--thread 1] [--all 1] [--unprivileged 1]`
//!
//! P, in the host's namespaces, makes R with clone3(CLONE_NEWUSER |
//! CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC |
//! CLONE_NEWNET) (without CLONE_NEWPID with `--pidns 0`), writes R's
//! uid_map and gid_map (`0 100000 65536`), and waits. R becomes root of
//! its namespace (setresuid 0), names its host `cryo-userns`, mounts a
//! tmpfs on DIR/mnt with a file in it, makes a System V segment with
//! data, and forks C. Both report to P through files in DIR/box, a
//! directory owned by the namespace's root (R cannot write the test's
//! own).
//!
//! The test dumps R (the tree's root, its parent P outside it). On
//! SIGTERM P passes the signal to R (by the pid in DIR/restored.pid if
//! there is one: R's pid in P's namespace changes when R's pid namespace
//! is its user namespace's), which checks: its ids inside (0),
//! its maps and setgroups, its pid (1 in its own pid namespace), that
//! every other namespace of its is owned by its user namespace
//! (NS_GET_USERNS), its hostname, the tmpfs file, the segment's data,
//! its capabilities, and what C says of itself (pid 2, uid 0, the same
//! user namespace). P writes R's verdict. With `--map 0` P writes no
//! map: R stays unmapped (its ids the overflow id inside, 65534), makes
//! no file in its tmpfs (the kernel refuses an unmapped owner) and finds
//! its maps empty again. With `--thread 1` R also runs a thread that
//! counts, which must still count after the restore, with its tid inside.
//! With `--all 1` R also gets a cgroup and a time namespace of its own
//! (owned by its user namespace too): its /proc/self/cgroup must read as
//! before, and CLOCK_MONOTONIC must not go back. With `--unprivileged 1`
//! the user namespace is an unprivileged user's: a process U of P's
//! becomes uid and gid 1000, makes R, denies setgroups and maps only its
//! own ids (`0 1000 1`), as a user without privileges may, then ends (R
//! goes to the test, a subreaper); P writes R's pid to DIR/container.pid.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryo_tests::wl;

const NAME: &str = "wl_userns";
/// The maps P (or U) writes, and the host uid of the namespace's root.
static MAP: std::sync::OnceLock<(&'static str, u32, &'static str)> = std::sync::OnceLock::new();

fn map() -> &'static str {
    MAP.get().map_or("0 100000 65536", |m| m.0)
}

fn setgroups_want() -> &'static str {
    MAP.get().map_or("allow", |m| m.2)
}
const HOST: &str = "cryo-userns";
const KEY: i32 = 0x5eed_0001;
const DATA: &[u8] = b"segment data of the user namespace";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn ns_inode(kind: &str) -> u64 {
    std::fs::metadata(format!("/proc/self/ns/{kind}")).map_or(0, |m| m.ino())
}

/// The user namespace owning this process's namespace `kind`.
fn owner(kind: &str) -> Result<u64, String> {
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    let f = std::fs::File::open(format!("/proc/self/ns/{kind}")).map_err(|e| e.to_string())?;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor.
    let fd = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(os_err(&format!("NS_GET_USERNS on {kind}")));
    }
    let ino = std::fs::metadata(format!("/proc/self/fd/{fd}")).map_or(0, |m| m.ino());
    // SAFETY: closing the descriptor just returned.
    unsafe { libc::close(fd) };
    Ok(ino)
}

fn cap_eff() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// What C says of itself.
fn child_says() -> String {
    // SAFETY: getpid and getuid take nothing.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    format!("{pid} {uid} {}", ns_inode("user"))
}

/// R's setup, inside its namespaces once P wrote its maps.
fn setup(tmp: &str, pidns: bool, mapped: bool) -> Result<(), String> {
    // SAFETY: plain calls with integer arguments.
    if mapped && unsafe { libc::setresgid(0, 0, 0) | libc::setresuid(0, 0, 0) } != 0 {
        return Err(os_err("setresuid(0) in the namespace"));
    }
    // SAFETY: the pointer and length are those of a live &str.
    if unsafe { libc::sethostname(HOST.as_ptr().cast(), HOST.len()) } != 0 {
        return Err(os_err("sethostname"));
    }
    let mnt = format!("{tmp}/mnt");
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| e.to_string());
    let (src, dst, fs) = (c("cryo-userns")?, c(&mnt)?, c("tmpfs")?);
    // SAFETY: every pointer is a live NUL-terminated string or null.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(os_err(&format!("mounting a tmpfs on {mnt}")));
    }
    if mapped {
        std::fs::write(format!("{mnt}/file"), b"in the container's tmpfs")
            .map_err(|e| format!("the tmpfs file: {e}"))?;
    }
    // SAFETY: shmget and shmat take plain values; the segment is attached
    // for the copy and detached right after.
    unsafe {
        let id = libc::shmget(KEY, 4096, libc::IPC_CREAT | 0o600);
        if id < 0 {
            return Err(os_err("shmget"));
        }
        let p = libc::shmat(id, std::ptr::null(), 0);
        if p as isize == -1 {
            return Err(os_err("shmat"));
        }
        std::ptr::copy_nonoverlapping(DATA.as_ptr(), p.cast::<u8>(), DATA.len());
        libc::shmdt(p);
    }
    // SAFETY: getpid takes nothing.
    let pid = unsafe { libc::getpid() };
    if pidns && pid != 1 {
        return Err(format!("pid {pid} in the new pid namespace, not 1"));
    }
    Ok(())
}

fn check(
    tmp: &str,
    (pidns, mapped): (bool, bool),
    caps: &str,
    said_before: &str,
    cmd: [i32; 2],
) -> Vec<String> {
    let mut fails = Vec::new();
    // SAFETY: plain getters.
    let ids = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getpid(),
        )
    };
    let want = if mapped { 0 } else { 65534 };
    if (ids.0, ids.1, ids.2) != (want, want, want) {
        fails.push(format!("ids inside are {ids:?}, not {want}"));
    }
    if pidns && ids.3 != 1 {
        fails.push(format!("pid {} inside, not 1", ids.3));
    }
    for f in ["uid_map", "gid_map"] {
        let m = std::fs::read_to_string(format!("/proc/self/{f}")).unwrap_or_default();
        let want = if mapped { map() } else { "" };
        if m.split_whitespace().collect::<Vec<_>>().join(" ") != want {
            fails.push(format!("{f} is {m:?}"));
        }
    }
    let sg = std::fs::read_to_string("/proc/self/setgroups").unwrap_or_default();
    if sg.trim() != setgroups_want() {
        fails.push(format!("setgroups is {sg:?}"));
    }
    let user = ns_inode("user");
    let mut kinds = vec!["mnt", "net", "uts", "ipc"];
    if pidns {
        kinds.push("pid");
    }
    if ALL.load(Ordering::SeqCst) {
        kinds.extend(["cgroup", "time"]);
        let now = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if Some(&now) != CGROUPS.get() {
            fails.push(format!(
                "/proc/self/cgroup reads {now:?}, read {:?}",
                CGROUPS.get()
            ));
        }
        let (mono, was) = (monotonic_ns(), MONO.load(Ordering::SeqCst));
        if mono < was {
            fails.push(format!("CLOCK_MONOTONIC went back from {was} to {mono} ns"));
        }
    }
    for k in kinds {
        match owner(k) {
            Ok(o) if o == user => {}
            Ok(o) => fails.push(format!(
                "its {k} namespace is owned by user:[{o}], not its own user:[{user}]"
            )),
            Err(e) => fails.push(e),
        }
    }
    let mut b = [0u8; 64];
    // SAFETY: gethostname writes at most the buffer's length.
    unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    let host =
        String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(0)]).into_owned();
    if host != HOST {
        fails.push(format!("hostname {host:?}"));
    }
    let file = std::fs::read_to_string(format!("{tmp}/mnt/file")).unwrap_or_default();
    if mapped && file != "in the container's tmpfs" {
        fails.push(format!("the tmpfs file holds {file:?}"));
    }
    // SAFETY: as in setup; the segment is only read.
    unsafe {
        let id = libc::shmget(KEY, 0, 0);
        let p = if id < 0 {
            std::ptr::null_mut()
        } else {
            libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY)
        };
        if id < 0 || p as isize == -1 {
            fails.push(os_err("the segment"));
        } else {
            let got = std::slice::from_raw_parts(p.cast::<u8>(), DATA.len());
            if got != DATA {
                fails.push("the segment's data changed".into());
            }
            libc::shmdt(p);
        }
    }
    if cap_eff() != caps {
        fails.push(format!("CapEff {} was {caps}", cap_eff()));
    }
    let said = wl::ask(cmd[1], cmd[0]);
    // Its pid and uid as before (the user namespace is another one now).
    let head = |s: &str| s.split(' ').take(2).collect::<Vec<_>>().join(" ");
    if head(&said) != head(said_before) {
        fails.push(format!("the child says {said:?}, said {said_before:?}"));
    }
    let want_pid = if pidns { "2 " } else { "" };
    if !said.starts_with(want_pid) || !said.contains(&format!(" {want} {user}")) {
        fails.push(format!(
            "the child says {said:?}: not pid 2, uid 0, in user:[{user}]"
        ));
    }
    fails
}

/// R: its namespaces' contents, its child, then the wait for SIGTERM.
static COUNT: AtomicU64 = AtomicU64::new(0);
/// `--all`: and what R saw of its cgroups and clock at ready.
static ALL: AtomicBool = AtomicBool::new(false);
static CGROUPS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static MONO: AtomicI64 = AtomicI64::new(0);

fn monotonic_ns() -> i64 {
    // SAFETY: zeroed is a valid timespec, which clock_gettime fills.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes into the local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}
static COUNTER_TID: AtomicI32 = AtomicI32::new(0);

/// A thread that counts; its tid (in R's pid namespace).
fn start_counter() -> Result<i32, String> {
    std::thread::Builder::new()
        .spawn(|| {
            loop {
                // SAFETY: gettid takes nothing.
                COUNTER_TID.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                COUNT.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .map_err(|e| format!("spawning the counting thread: {e}"))?;
    let start = Instant::now();
    while COUNTER_TID.load(Ordering::SeqCst) == 0 {
        if start.elapsed() > Duration::from_secs(5) {
            return Err("the counting thread did not start".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(COUNTER_TID.load(Ordering::SeqCst))
}

fn check_counter(tid: i32, fails: &mut Vec<String>) {
    let before = COUNT.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    if COUNT.load(Ordering::SeqCst) == before {
        fails.push("the counting thread stopped".into());
    }
    // What the thread reads of itself now.
    let now = COUNTER_TID.load(Ordering::SeqCst);
    if now != tid {
        fails.push(format!("the counting thread's tid is {now}, was {tid}"));
    }
}

fn container(
    tmp: &str,
    (pidns, mapped, threaded): (bool, bool, bool),
    go: i32,
) -> Result<Vec<String>, String> {
    let box_dir = format!("{tmp}/box");
    let mut b = [0u8; 1];
    let got = wl::read_exact(go, &mut b);
    // SAFETY: closing our end of the pipe from P (it leads outside the
    // tree the test dumps).
    unsafe { libc::close(go) };
    if !got {
        return Err("the parent did not write the maps".into());
    }
    setup(tmp, pidns, mapped)?;
    let (cmd, back) = (wl::pipe()?, wl::pipe()?);
    // SAFETY: fork of this single-threaded process; the child answers
    // until its command pipe closes.
    let child = unsafe { libc::fork() };
    if child == 0 {
        wl::serve(cmd[0], back[1], &[cmd[1], back[0]], child_says);
    }
    if child < 0 {
        return Err(os_err("fork"));
    }
    let said = wl::ask(cmd[1], back[0]);
    let caps = cap_eff();
    let _ = CGROUPS.set(std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
    MONO.store(monotonic_ns(), Ordering::SeqCst);
    // After the fork: the child copies no thread.
    let thread_tid = if threaded {
        Some(start_counter()?)
    } else {
        None
    };
    wl::write_atomic(
        std::path::Path::new(&format!("{box_dir}/ready")),
        b"ready\n",
    )
    .map_err(|e| format!("{box_dir}/ready: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = check(tmp, (pidns, mapped), &caps, &said, [back[0], cmd[1]]);
    if let Some(tid) = thread_tid {
        check_counter(tid, &mut fails);
    }
    wl::end_server(cmd[1], child);
    Ok(fails)
}

fn main() {
    let usage =
        "wl_userns --ready FILE --verdict FILE --tmp DIR [--pidns 0] [--map 0] [--thread 1] [--all 1] [--unprivileged 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let tmp = a.tmp_dir(NAME, usage).display().to_string();
    let pidns = a.get("pidns") != Some("0");
    let mapped = a.get("map") != Some("0");
    let threaded = a.get("thread") == Some("1");
    let unprivileged = a.get("unprivileged") == Some("1");
    let _ = MAP.set(if unprivileged {
        ("0 1000 1", 1000, "deny")
    } else {
        ("0 100000 65536", 100000, "allow")
    });
    let root_uid = MAP.get().map_or(100000, |m| m.1);
    let box_dir = format!("{tmp}/box");
    let prep = std::fs::create_dir_all(format!("{tmp}/mnt"))
        .and_then(|()| std::fs::create_dir_all(&box_dir))
        .and_then(|()| std::os::unix::fs::chown(&box_dir, Some(root_uid), Some(root_uid)))
        .and_then(|()| {
            // Unmapped, R is no one the host's files know: any may write.
            use std::os::unix::fs::PermissionsExt;
            let mode = if mapped { 0o755 } else { 0o777 };
            std::fs::set_permissions(&box_dir, std::fs::Permissions::from_mode(mode))
        });
    if let Err(e) = prep {
        wl::finish(NAME, &a.verdict, Err(format!("{box_dir}: {e}")));
    }
    if let Err(e) = wl::install_term_handler() {
        wl::finish(NAME, &a.verdict, Err(e));
    }
    let go = match wl::pipe() {
        Ok(p) => p,
        Err(e) => wl::finish(NAME, &a.verdict, Err(e)),
    };
    let mut flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET;
    if pidns {
        flags |= libc::CLONE_NEWPID;
    }
    if a.get("all") == Some("1") {
        ALL.store(true, Ordering::SeqCst);
        flags |= libc::CLONE_NEWCGROUP | libc::CLONE_NEWTIME;
    }
    if unprivileged {
        match unprivileged_container(flags, go, &tmp, (pidns, mapped, threaded)) {
            Ok(pid) => {
                let _ = std::fs::write(format!("{tmp}/container.pid"), pid.to_string());
                parent(&a, &tmp, pid)
            }
            Err(e) => wl::finish(NAME, &a.verdict, Err(e)),
        }
    }
    let r = match wl::clone_sharing(flags as u64) {
        Ok(0) => {
            // SAFETY: closing the parent's end of the pipe.
            unsafe { libc::close(go[1]) };
            container_main(&tmp, (pidns, mapped, threaded), go[0])
        }
        Ok(pid) => pid,
        Err(e) => wl::finish(NAME, &a.verdict, Err(e)),
    };
    for f in ["uid_map", "gid_map"].into_iter().filter(|_| mapped) {
        if let Err(e) = std::fs::write(format!("/proc/{r}/{f}"), map()) {
            wl::finish(NAME, &a.verdict, Err(format!("writing {f}: {e}")));
        }
    }
    wl::write_fd(go[1], b"g");
    parent(&a, &tmp, r)
}

/// R: [`container`], then its verdict in DIR/box for P. Never returns.
fn container_main(tmp: &str, modes: (bool, bool, bool), go: i32) -> ! {
    let text = match container(tmp, modes, go) {
        Ok(f) if f.is_empty() => "PASS\n".to_string(),
        Ok(f) => format!("FAIL: {}\n", f.join("; ")),
        Err(e) => format!("FAIL: setup: {e}\n"),
    };
    let _ = wl::write_atomic(
        std::path::Path::new(&format!("{tmp}/box/verdict")),
        text.as_bytes(),
    );
    // SAFETY: end at once.
    unsafe { libc::_exit(0) }
}

/// R as the child of U, an unprivileged process of P's (see the module):
/// R's pid, which U reports before it ends.
fn unprivileged_container(
    flags: libc::c_int,
    go: [i32; 2],
    tmp: &str,
    modes: (bool, bool, bool),
) -> Result<i32, String> {
    let back = wl::pipe()?;
    // SAFETY: fork of this single-threaded process; U makes R, writes its
    // maps, reports R's pid and ends.
    let u = unsafe { libc::fork() };
    if u < 0 {
        return Err(os_err("fork"));
    }
    if u == 0 {
        // SAFETY: dropping to an unprivileged user: no groups, then the
        // ids (the group first, while it may).
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(1000, 1000, 1000) == 0
                && libc::setresuid(1000, 1000, 1000) == 0
                // The id change made it undumpable, its /proc files (and
                // R's) root's: a user's own process is dumpable.
                && libc::prctl(libc::PR_SET_DUMPABLE, 1) == 0
        };
        let r = if dropped {
            wl::clone_sharing(flags as u64)
        } else {
            Err(os_err("dropping to uid 1000"))
        };
        let r = match r {
            Ok(0) => {
                // SAFETY: closing the other ends of the pipes.
                unsafe {
                    libc::close(go[1]);
                    libc::close(back[0]);
                    libc::close(back[1]);
                }
                container_main(tmp, modes, go[0])
            }
            Ok(pid) => pid,
            Err(_) => -1,
        };
        // As an unprivileged user may: setgroups denied, its own ids only.
        let wrote = r > 0
            && std::fs::write(format!("/proc/{r}/setgroups"), "deny").is_ok()
            && std::fs::write(format!("/proc/{r}/uid_map"), map()).is_ok()
            && std::fs::write(format!("/proc/{r}/gid_map"), map()).is_ok();
        wl::write_fd(
            back[1],
            format!("{}\n", if wrote { r } else { -1 }).as_bytes(),
        );
        wl::write_fd(go[1], b"g");
        // SAFETY: U ends; R goes to the nearest subreaper.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: closing U's end; collecting U once it reported.
    unsafe { libc::close(back[1]) };
    let line = wl::read_line(back[0]);
    // SAFETY: U is our child.
    unsafe { libc::waitpid(u, std::ptr::null_mut(), 0) };
    match line.trim().parse::<i32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err("U did not make the container or write its maps".into()),
    }
}

/// P once R runs: wait for R's ready, then for SIGTERM, pass it on, and
/// write R's verdict.
fn parent(a: &wl::Args, tmp: &str, r: i32) -> ! {
    let box_dir = format!("{tmp}/box");
    let ready = std::path::Path::new(&box_dir).join("ready");
    let verdict = std::path::Path::new(&box_dir).join("verdict");
    let start = Instant::now();
    while !ready.exists() && !verdict.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !verdict.exists() {
        let _ = wl::write_atomic(&a.ready, b"ready\n");
    }
    // P: collect what ends (R killed by a dump), pass SIGTERM on, then
    // wait for R's verdict.
    while !wl::TERM.load(Ordering::SeqCst) && !verdict.exists() {
        // SAFETY: collecting our own children without blocking.
        unsafe { while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {} };
        std::thread::sleep(Duration::from_millis(5));
    }
    // A container whose pid namespace its user namespace owns comes back
    // with another pid here: the test names it (cryo restore --pidfile).
    let r = std::fs::read_to_string(format!("{tmp}/restored.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(r);
    // SAFETY: a signal to the process we made (or its restored self).
    unsafe { libc::kill(r, libc::SIGTERM) };
    let start = Instant::now();
    while !verdict.exists() && start.elapsed() < Duration::from_secs(30) {
        // SAFETY: as above.
        unsafe { while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {} };
        std::thread::sleep(Duration::from_millis(5));
    }
    let text =
        std::fs::read_to_string(&verdict).unwrap_or_else(|_| "FAIL: R gave no verdict\n".into());
    let result = match text.trim().strip_prefix("FAIL: ") {
        None if text.trim() == "PASS" => Ok(Vec::new()),
        Some(f) => Ok(vec![f.to_string()]),
        None => Err(format!("R's verdict {text:?}")),
    };
    wl::finish(NAME, &a.verdict, result);
}
