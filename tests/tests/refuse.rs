//! What cryo must refuse, and how: a clear message, a non-zero exit, no
//! image that looks complete, and the process it was pointed at left exactly
//! as it was (running, untraced, same mappings, same blocked mask).

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cryo_tests::*;

const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Does `text` mention descriptor `fd` ("fd 1", not "fd 10")?
fn mentions_fd(text: &str, fd: i32) -> bool {
    let key = format!("fd {fd}");
    text.match_indices(&key).any(|(i, _)| {
        !text[i + key.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Does `text` mention `pid` as a number of its own (not inside a longer one)?
fn count_pid(text: &str, pid: i32) -> usize {
    let key = pid.to_string();
    text.match_indices(&key)
        .filter(|(i, _)| {
            let before = text[..*i].chars().next_back();
            let after = text[i + key.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_digit())
                && !after.is_some_and(|c| c.is_ascii_digit())
        })
        .count()
}

fn sleep_bin() -> &'static str {
    ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("no sleep binary in /bin or /usr/bin")
}

/// What a refused operation must not have changed in a live process.
struct Untouched {
    pid: i32,
    maps: String,
    sigblk: Option<String>,
    /// Signals pending for each thread and for the process (a signal cryo
    /// raised while working in the task must not be left for it).
    pending: Vec<(String, Option<String>, Option<String>)>,
}

fn pending_signals(pid: i32) -> Vec<(String, Option<String>, Option<String>)> {
    let mut v: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_else(|_| Vec::new())
        .into_iter()
        .map(|tid: String| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                .unwrap_or_default();
            let field = |k: &str| {
                s.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            (tid.clone(), field("SigPnd:"), field("ShdPnd:"))
        })
        .collect();
    v.sort();
    v
}

impl Untouched {
    fn record(pid: i32) -> Untouched {
        Untouched {
            pid,
            maps: proc_maps(pid),
            sigblk: proc_status_field(pid, "SigBlk"),
            pending: pending_signals(pid),
        }
    }

    fn assert_unchanged(&self, what: &str) {
        let pid = self.pid;
        assert!(pid_alive(pid), "{what}: pid {pid} is gone");
        assert_eq!(
            wait_untraced(pid, Duration::from_secs(5)),
            Some(0),
            "{what}: pid {pid} still traced 5 s later"
        );
        let state = proc_state(pid);
        assert!(
            matches!(state, Some('S') | Some('R')),
            "{what}: pid {pid} is in state {state:?}, expected running or sleeping (not stopped)"
        );
        let maps = proc_maps(pid);
        assert!(
            maps == self.maps,
            "{what}: maps of pid {pid} changed:\n{}",
            maps_diff(&self.maps, &maps)
        );
        assert_eq!(
            proc_status_field(pid, "SigBlk"),
            self.sigblk,
            "{what}: SigBlk of pid {pid} changed"
        );
        assert_eq!(
            pending_signals(pid),
            self.pending,
            "{what}: signals pending in pid {pid} (thread, SigPnd, ShdPnd) changed"
        );
    }
}

/// Dumps `pid` (kill mode, the default: a refusal must not kill it) and
/// checks that cryo refused cleanly with a message containing every string
/// of `must` (case-insensitive) and `fd <fd>` if given, and left the process
/// untouched. Returns cryo's stderr.
fn assert_dump_refused(pid: i32, fd: Option<i32>, must: &[&str], what: &str) -> String {
    let before = Untouched::record(pid);
    let dir = TestDir::new();
    let img = dir.subdir("img");
    let out = dump(pid, &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("{what}: cryo dump of pid {pid} should have been refused: {e}");
    }
    let err = stderr_of(&out);
    let lower = err.to_lowercase();
    if let Some(fd) = fd {
        assert!(
            mentions_fd(&err, fd),
            "{what}: cryo's message does not name fd {fd}:\n{err}"
        );
    }
    for m in must {
        assert!(
            lower.contains(&m.to_lowercase()),
            "{what}: cryo's message does not mention {m:?}:\n{err}"
        );
    }
    assert!(
        !img.join("inventory.img").exists(),
        "{what}: the refused dump left an inventory.img (a complete-looking image) in {}",
        img.display()
    );
    before.assert_unchanged(what);
    err
}

#[test]
fn dump_refuses_pipe_on_stdout() {
    become_subreaper();
    let mut child = Command::new(sleep_bin())
        .arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let mut guard = PidGuard::new(child.id() as i32);
    let pid = guard.pid();
    // Keep the read end open for the whole test.
    let _stdout = child.stdout.take().expect("piped stdout");
    drop(child);
    wait_settled(pid, SETTLE_TIMEOUT);
    let link = std::fs::read_link(format!("/proc/{pid}/fd/1")).expect("readlink fd 1");
    assert!(
        link.to_string_lossy().starts_with("pipe:"),
        "setup: fd 1 of sleep is {link:?}, not a pipe"
    );

    assert_dump_refused(pid, Some(1), &["pipe"], "pipe on stdout");

    let exit = guard.kill();
    assert_eq!(
        exit,
        Some(Exit::Signal(libc::SIGKILL)),
        "sleep (pid {pid}) did not end by our SIGKILL"
    );
}

/// `sleep 1000` with its standard descriptors on /dev/null.
fn sleep_cmd() -> Command {
    let mut cmd = Command::new(sleep_bin());
    cmd.arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Spawn `cmd`, guarded (and reaped) by pid.
fn spawn_guarded(mut cmd: Command, what: &str) -> PidGuard {
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let guard = PidGuard::new(child.id() as i32);
    drop(child);
    guard
}

/// A `sleep 1000` with our descriptor `raw` as its fd 3 (kept across
/// exec), guarded by pid.
fn sleep_with_fd3(raw: RawFd) -> PidGuard {
    let mut cmd = sleep_cmd();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // the async-signal-safe dup2 and fcntl on descriptor numbers (no
    // allocation, no locks); `raw` stays open in the parent until after
    // spawn returns, so it is open in the child. dup2 gives fd 3 without
    // FD_CLOEXEC; if `raw` already is fd 3, FD_CLOEXEC is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            let r = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn_guarded(cmd, "sleep with a descriptor on fd 3")
}

/// A task under a seccomp filter is refused (cryo cannot put the filter
/// back, and a restore without it would give the task more than it had),
/// naming the task and seccomp, and left running untouched.
#[test]
fn dump_refuses_a_task_under_seccomp() {
    become_subreaper();
    let mut cmd = sleep_cmd();
    // One BPF instruction: return SECCOMP_RET_ALLOW.
    let filter = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    }];
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two prctl calls (async-signal-safe, no allocation); `filter`
    // is copied into the closure and outlives the calls, and the program
    // points at it with its length.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut guard = spawn_guarded(cmd, "sleep under a seccomp filter");
    let pid = guard.pid();
    wait_settled(pid, SETTLE_TIMEOUT);
    assert_eq!(
        proc_status_field(pid, "Seccomp").as_deref(),
        Some("2"),
        "setup: sleep is not under a seccomp filter"
    );
    let err = assert_dump_refused(pid, None, &["seccomp", &format!("task {pid}")], "seccomp");
    assert!(
        err.contains("filter"),
        "the refusal does not say filter:\n{err}"
    );
    let exit = guard.kill();
    assert_eq!(
        exit,
        Some(Exit::Signal(libc::SIGKILL)),
        "sleep (pid {pid}) did not end by our SIGKILL"
    );
}

#[test]
fn dump_refuses_unix_socket_on_fd_3() {
    become_subreaper();
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let raw: RawFd = theirs.as_raw_fd();
    let mut guard = sleep_with_fd3(raw);
    let pid = guard.pid();
    drop(theirs);
    wait_settled(pid, SETTLE_TIMEOUT);
    let link = std::fs::read_link(format!("/proc/{pid}/fd/3")).expect("readlink fd 3");
    assert!(
        link.to_string_lossy().starts_with("socket:"),
        "setup: fd 3 of sleep is {link:?}, not a socket"
    );

    // Its peer is held by this test, outside the dumped tree.
    assert_dump_refused(
        pid,
        Some(3),
        &["unix socket", "outside the dumped tree"],
        "UNIX socket on fd 3 connected to another process",
    );

    // The socket still works: the peer is alive and connected (no data,
    // no EOF).
    ours.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 1];
    match (&ours).read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("our end of the socketpair: expected no data and no EOF, got {other:?}"),
    }
    let exit = guard.kill();
    assert_eq!(
        exit,
        Some(Exit::Signal(libc::SIGKILL)),
        "sleep (pid {pid}) did not end by our SIGKILL"
    );
}

/// The children of this process (all its threads'), for spotting a task a
/// failed restore left behind.
fn own_children() -> Vec<i32> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for t in rd.flatten() {
            let p = t.path().join("children");
            let s = std::fs::read_to_string(p).unwrap_or_default();
            v.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn restore_refuses_pid_in_use() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    assert!(pid_alive(pid), "pid {pid} gone after dump -R");
    assert_eq!(
        wait_untraced(pid, Duration::from_secs(5)),
        Some(0),
        "pid {pid} still traced after dump -R"
    );
    let before = Untouched::record(pid);
    let children_before = own_children();
    assert!(
        img.join("inventory.img").exists(),
        "dump -R wrote no inventory.img"
    );

    let out = restore_detached(&img);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("restore of pid {pid} while it runs should have been refused: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.to_lowercase().contains("in use"),
        "the message does not say that the pid is in use:\n{err}"
    );
    assert!(
        count_pid(&err, pid) >= 1,
        "the message does not name pid {pid}:\n{err}"
    );
    // The holder is the original itself: named by its pid (and, if cryo
    // says more, by its name).
    assert!(
        count_pid(&err, pid) >= 2 || err.contains("wl-single") || err.contains("wl_single"),
        "the message does not name the process holding pid {pid}:\n{err}"
    );

    before.assert_unchanged("original after a refused restore");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("readlink exe");
    assert_eq!(
        exe,
        workload_bin("wl_single"),
        "pid {pid} runs something else"
    );
    let children_after = own_children();
    assert_eq!(
        children_after, children_before,
        "the refused restore left a task behind (children of the test)"
    );
    wl.assert_pass("original after a refused restore");
}

#[test]
fn check_reports_ptrace_seize() {
    let out = run_cryo(&["check"], &[]);
    assert_cryo_ok(&out, "cryo check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.contains("ptrace-seize")),
        "cryo check printed no line about ptrace-seize:\n{stdout}"
    );
}

/// A task in a user namespace inside another one (not kept yet) is
/// refused, naming the namespace, and left running.
#[test]
fn dump_refuses_task_in_other_namespace() {
    become_subreaper();
    let dir = TestDir::new();
    let log = std::fs::File::create(dir.join("log")).expect("create log");
    let child = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "unshare",
            "--user",
            sleep_bin(),
            "1000",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn unshare --user sleep");
    let mut guard = PidGuard::new(child.id() as i32);
    let pid = guard.pid();
    drop(child);
    // unshare execs sleep in the same process once the namespace exists.
    let start = std::time::Instant::now();
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| !p.to_string_lossy().contains("sleep"))
        .unwrap_or(true)
    {
        assert!(
            start.elapsed() < SETTLE_TIMEOUT,
            "unshare did not exec sleep"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    wait_settled(pid, SETTLE_TIMEOUT);

    assert_dump_refused(
        pid,
        None,
        &["user namespace", "inside another one"],
        "nested user namespace",
    );

    let exit = guard.kill();
    assert_eq!(exit, Some(Exit::Signal(libc::SIGKILL)));
}

/// A terminal on stdout (a pty slave whose master is outside the tree,
/// not the task's controlling terminal) is refused.
#[test]
fn dump_refuses_terminal_on_stdout() {
    become_subreaper();
    // SAFETY: posix_openpt returns a new descriptor or -1; no memory is
    // passed.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(
        master >= 0,
        "posix_openpt: {}",
        std::io::Error::last_os_error()
    );
    // Not inherited by the sleep: its master stays outside the tree (a
    // pair inside the tree would be dumped).
    // SAFETY: setting FD_CLOEXEC on the descriptor just opened.
    unsafe { libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: master is the pty master just opened.
    assert_eq!(unsafe { libc::grantpt(master) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::unlockpt(master) }, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: name has room for 128 bytes, the length passed.
    let r = unsafe { libc::ptsname_r(master, name.as_mut_ptr(), name.len()) };
    assert_eq!(r, 0);
    // SAFETY: ptsname_r wrote a NUL-terminated path into name.
    let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = std::fs::OpenOptions::new()
        .write(true)
        .open(&slave_path)
        .expect("open pty slave");
    let child = Command::new(sleep_bin())
        .arg("1000")
        .stdin(Stdio::null())
        .stdout(slave)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let mut guard = PidGuard::new(child.id() as i32);
    let pid = guard.pid();
    drop(child);
    wait_settled(pid, SETTLE_TIMEOUT);

    assert_dump_refused(pid, Some(1), &["terminal"], "pty on stdout");

    let exit = guard.kill();
    assert_eq!(exit, Some(Exit::Signal(libc::SIGKILL)));
    // SAFETY: closing the master we opened.
    unsafe { libc::close(master) };
}

/// A tmpfs of `size` mounted on `dir` by this test, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a {size} tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A dump into a directory that runs out of space (ENOSPC) fails with
/// the file it could not write, in every mode, leaves no image behind
/// (no inventory, no image file), and the task runs on untouched.
#[test]
fn dump_to_a_full_disk_fails_cleanly() {
    become_subreaper();
    let dir = TestDir::new();
    let disk = dir.subdir("small");
    let _mount = SmallDisk::mount(&disk, "1m");
    let mut wl = Workload::start("wl_bench", &["--mib", "8"], &dir);
    let pid = wl.pid();
    let before = Untouched::record(pid);
    let img = disk.join("img");
    let modes: [&[&str]; 4] = [&[], &["-R"], &["--compress", "none"], &["--pre-copy"]];
    for mode in modes {
        let what = format!("dump {mode:?} to a 1 MiB disk");
        let out = dump(pid, &img, mode, &[]);
        if let Err(e) = check_cryo_failed_cleanly(&out) {
            panic!("{what}: should have failed: {e}");
        }
        let err = stderr_of(&out);
        assert!(
            err.contains("No space left") && err.contains(".img"),
            "{what}: the message does not say which file ran out of space:\n{err}"
        );
        let left: Vec<String> = std::fs::read_dir(&img)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".img"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{what}: image files left behind: {left:?}");
        before.assert_unchanged(&what);
    }
    // A directory cryo makes for an image is its owner's alone.
    let fresh = dir.path().join("fresh").join("img");
    let pid_s = pid.to_string();
    let fresh_s = fresh.to_str().expect("utf-8 path");
    let out = run_cryo(&["dump", "-t", &pid_s, "-D", fresh_s, "-R"], &[]);
    assert_cryo_ok(&out, "dump -R into a new directory");
    for d in [fresh.clone(), dir.path().join("fresh")] {
        let mode = std::fs::metadata(&d).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o700), "{} is not 0700", d.display());
    }
    wl.assert_pass("after four dumps that ran out of space and one -R");
}

/// Every step of a dump of `wl` (each seize, each syscall injected into a
/// task, each parasite command, each image file written) made to fail in
/// turn (CRYO_FAULT `fail-step-N`, N raised until the dump succeeds), with
/// --leave-running and in kill mode: each time cryo fails with a message,
/// leaves no image file, and every process of the tree runs on untouched;
/// the kill-mode dump that finally succeeds restores and passes.
fn fail_every_step(mut wl: Workload, dir: &TestDir) {
    let pid = wl.pid();
    let guard = TreeGuard::new(tree_pids(pid));
    let img = dir.subdir("img");
    let modes: [&[&str]; 2] = [&["-R"], &[]];
    for mode in modes {
        let mut n = 1u32;
        loop {
            assert!(n < 3000, "{mode:?}: still failing at step {n}");
            let before: Vec<Untouched> =
                guard.pids().iter().map(|&p| Untouched::record(p)).collect();
            let fault = format!("fail-step-{n}");
            let out = dump(pid, &img, mode, &[("CRYO_FAULT", &fault)]);
            if out.status.success() {
                break;
            }
            let what = format!("dump {mode:?} failing at step {n}");
            if let Err(e) = check_cryo_failed_cleanly(&out) {
                panic!("{what}: {e}");
            }
            let err = stderr_of(&out);
            assert!(
                err.contains("injected failure"),
                "{what}: failed for another reason:\n{err}"
            );
            let left: Vec<String> = file_names(&img)
                .into_iter()
                .filter(|n| n.contains(".img"))
                .collect();
            assert!(left.is_empty(), "{what}: image files left behind: {left:?}");
            for b in &before {
                b.assert_unchanged(&what);
            }
            n += 1;
        }
        eprintln!("dump {mode:?}: each of its {} steps failed once", n - 1);
        assert!(n > 10, "dump {mode:?} has only {} steps", n - 1);
    }
    assert!(
        reap_gone(guard.pids(), Duration::from_secs(10)),
        "tasks left after the kill-mode dump"
    );
    restore_ok(&mut wl, &img);
    wl.assert_pass("after a dump failing at every step, then a whole one");
}

/// [`fail_every_step`] on one process with two threads, keeping live
/// values in its vector registers across the dumps.
#[test]
fn dump_failing_at_every_step_leaves_the_task_as_it_was() {
    become_subreaper();
    let dir = TestDir::new();
    let wl = Workload::single_with("nanosleep", &dir, &["--thread"]);
    fail_every_step(wl, &dir);
}

/// [`fail_every_step`] on two processes holding every descriptor kind
/// cryo supports (so every descriptor's dump step fails once too).
#[test]
fn dump_of_every_descriptor_kind_failing_at_every_step_leaves_the_tree_as_it_was() {
    become_subreaper();
    let dir = TestDir::new();
    let tmp = dir.subdir("tmp");
    let wl = Workload::start("wl_fds", &["--tmp", tmp.to_str().expect("utf-8")], &dir);
    fail_every_step(wl, &dir);
}

/// A parasite that stops answering (CRYO_FAULT `fail-silent-parasite`: a
/// command it never replies to) fails the dump within cryo's command
/// timeout, with a message naming the task, and the task (two threads)
/// runs on untouched; a dump and restore afterwards pass.
#[test]
fn dump_with_a_silent_parasite_fails_and_leaves_the_task_as_it_was() {
    become_subreaper();
    let dir = TestDir::new();
    let mut wl = Workload::single_with("nanosleep", &dir, &["--thread"]);
    let pid = wl.pid();
    let img = dir.subdir("img");
    for mode in [&["-R"][..], &[]] {
        let before = Untouched::record(pid);
        let t0 = std::time::Instant::now();
        let out = dump(pid, &img, mode, &[("CRYO_FAULT", "fail-silent-parasite")]);
        eprintln!(
            "dump {mode:?} with a silent parasite failed after {:?}",
            t0.elapsed()
        );
        if let Err(e) = check_cryo_failed_cleanly(&out) {
            panic!("dump {mode:?} with a silent parasite: {e}");
        }
        let err = stderr_of(&out);
        for want in [format!("task {pid}"), "did not answer".to_string()] {
            assert!(err.contains(&want), "stderr does not say {want:?}:\n{err}");
        }
        before.assert_unchanged(&format!("dump {mode:?} with a silent parasite"));
    }
    dump_ok(&mut wl, &img, &[]);
    wl.assert_gone_after_dump();
    restore_ok(&mut wl, &img);
    wl.assert_pass("after two dumps whose parasite fell silent");
}
