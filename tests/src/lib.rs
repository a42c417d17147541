//! Harness for cryo's black-box checkpoint/restore scenarios.
//!
//! The scenarios in `tests/` start workload programs (the bins of this
//! crate), run the real `cryo` binary on them and read the workloads'
//! verdicts. Everything a test starts is cleaned up by pid: the test process
//! becomes a child subreaper so that a restored, detached task is reparented
//! to it (and can be waited for and reaped), and `Drop` kills what is left.
//!
//! Run them with `cargo nextest run -p cryo-tests` after building the whole
//! workspace (`cargo build --workspace`), so that `target/debug/cryo` exists;
//! `.config/nextest.toml` runs them one at a time (a dumped pid must stay
//! free until it is restored).

pub mod benchdata;
pub mod cg;
pub mod msg;
pub mod wl;

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a cryo run may take before the harness kills it.
pub const CRYO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a workload may take to write its ready file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a workload may take to write its verdict and exit after SIGTERM.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(20);

/// The directory holding the bins of the workspace (`target/debug`): the
/// test executables live in `target/debug/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .expect("test executable has a parent directory");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The cryo binary: next to the test executables, or `$CRYO_BIN`.
pub fn cryo_bin() -> PathBuf {
    let p = bin_dir().join("cryo");
    if p.is_file() {
        return p;
    }
    if let Some(p) = std::env::var_os("CRYO_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "cryo binary not found at {} and $CRYO_BIN is not set to a file: build the workspace first \
         (cargo build --workspace)",
        p.display()
    );
}

/// A workload bin of this crate (`target/debug/<name>`).
pub fn workload_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "workload {} not built (cargo build -p cryo-tests --bins)",
        p.display()
    );
    p
}

/// Makes the calling process a child subreaper, so that orphans among its
/// descendants (a task restored with `cryo restore -d`) become its children.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument and only
    // changes an attribute of this process.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "prctl(PR_SET_CHILD_SUBREAPER): {}",
        std::io::Error::last_os_error()
    );
}

/// A temporary directory `/tmp/cryo-test-<pid>-<n>`, removed on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/cryo-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates (if needed) and returns the subdirectory `name`.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Is there a live (non-zombie) process with this pid?
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// How a waited-for process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Gone, but it was not our child, so its status is unknown.
    Unknown,
}

/// Reaps `pid` if it is a zombie child of ours; returns its status.
pub fn try_reap(pid: i32) -> Option<Exit> {
    let mut status = 0;
    // SAFETY: status is a valid out pointer; WNOHANG never blocks.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid {
        Some(decode_status(status))
    } else {
        None
    }
}

fn decode_status(status: i32) -> Exit {
    if libc::WIFEXITED(status) {
        Exit::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Unknown
    }
}

/// Waits until `pid` is gone: reaps it if it is our child (directly or
/// through the subreaper), otherwise polls. None on timeout.
pub fn wait_exit(pid: i32, timeout: Duration) -> Option<Exit> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(decode_status(status));
        }
        if r < 0 && !pid_alive(pid) {
            // Not our child (ECHILD) and gone.
            return Some(Exit::Unknown);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pids of the process tree under `root` (root first, then the
/// children of every thread, breadth first), zombies included.
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path().join("children")).unwrap_or_default();
                for c in text
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok())
                {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        i += 1;
    }
    out
}

/// Waits until none of `pids` exists any more (not even as a zombie),
/// reaping those that are, or become, our children. False on timeout.
pub fn reap_gone(pids: &[i32], timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        let mut left = false;
        for &pid in pids {
            let _ = try_reap(pid);
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                left = true;
            }
        }
        if !left {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reaps every child of this process that is a zombie (tasks of a failed
/// restore, helpers included, fall to this test, a subreaper).
pub fn reap_zombie_children() {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{me}/task")) else {
        return;
    };
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path().join("children")).unwrap_or_default();
        for c in text
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            if !pid_alive(c) {
                let _ = try_reap(c);
            }
        }
    }
}

/// Kills (SIGKILL) every process of a tree by pid when dropped, and reaps
/// them: a tree test leaves nothing behind even when it fails.
pub struct TreeGuard {
    pids: Vec<i32>,
}

impl TreeGuard {
    pub fn new(pids: Vec<i32>) -> TreeGuard {
        TreeGuard { pids }
    }

    pub fn pids(&self) -> &[i32] {
        &self.pids
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if pid_alive(pid) {
                // SAFETY: kill by an explicit, positive pid of the tree this
                // test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = reap_gone(&self.pids, Duration::from_secs(5));
    }
}

/// Sends SIGKILL to `pid` if it is alive and reaps it if it is ours.
pub fn kill_and_reap(pid: i32) {
    if pid <= 0 {
        return;
    }
    if pid_alive(pid) {
        // SAFETY: kill by an explicit, positive pid that we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = wait_exit(pid, Duration::from_secs(5));
}

/// Kills (SIGKILL) and reaps a process by its pid when dropped: for
/// processes a test starts itself outside [`Workload`].
pub struct PidGuard {
    pid: i32,
}

impl PidGuard {
    pub fn new(pid: i32) -> PidGuard {
        PidGuard { pid }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Kills and reaps the process now; returns how it ended (None if it
    /// did not go away).
    pub fn kill(&mut self) -> Option<Exit> {
        let pid = std::mem::replace(&mut self.pid, 0);
        if pid <= 0 {
            return None;
        }
        if pid_alive(pid) {
            // SAFETY: kill by an explicit, positive pid of a process this
            // test started and has not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_exit(pid, Duration::from_secs(5))
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The state letter of /proc/<pid>/stat (`S`, `R`, `Z`, ...).
pub fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let i = s.rfind(')')?;
    s[i + 1..].split_whitespace().next()?.chars().next()
}

/// Waits until `pid` sleeps (state `S`) with a mapping layout that no longer
/// changes (the dynamic loader is done), so that a later comparison of its
/// maps is meaningful. Panics after `timeout`.
pub fn wait_settled(pid: i32, timeout: Duration) {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if proc_state(pid) == Some('S') && !maps.is_empty() && maps == last {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "pid {pid} did not settle within {timeout:?} (state {:?})",
            proc_state(pid)
        );
        last = maps;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A field of /proc/<pid>/status, trimmed ("TracerPid" -> "0").
pub fn proc_status_field(pid: i32, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let key = format!("{name}:");
    s.lines()
        .find(|l| l.starts_with(&key))
        .map(|l| l[key.len()..].trim().to_string())
}

/// TracerPid of a live process.
pub fn tracer_pid(pid: i32) -> Option<i32> {
    proc_status_field(pid, "TracerPid").and_then(|v| v.parse().ok())
}

/// Waits (up to `timeout`) until `pid` is not traced; returns the last TracerPid.
pub fn wait_untraced(pid: i32, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        let t = tracer_pid(pid);
        if t == Some(0) || start.elapsed() > timeout {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// /proc/<pid>/maps as text.
pub fn proc_maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/maps: {e}"))
}

/// The lines present in only one of two /proc/PID/maps texts, for messages.
pub fn maps_diff(before: &str, after: &str) -> String {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let mut out = String::new();
    for l in &b {
        if !a.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &a {
        if !b.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    out
}

/// Contents of files that a workload shares with the outside world (its log,
/// the files under `<dir>/tmp`). An image does not contain them: to restore
/// an image taken with `--leave-running` after the original has run on and
/// changed them, put them back first, as a user would restore a file system
/// snapshot together with the image. Written back in place (same inodes).
pub struct FileSnapshot {
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl FileSnapshot {
    /// The log and every regular file directly under `<dir>/tmp`.
    pub fn of_workload(dir: &TestDir) -> FileSnapshot {
        let mut paths = vec![dir.join("log")];
        let tmp = dir.join("tmp");
        if tmp.is_dir() {
            paths.extend(file_names(&tmp).into_iter().map(|n| tmp.join(n)));
        }
        let files = paths
            .into_iter()
            .map(|p| {
                let data =
                    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                (p, data)
            })
            .collect();
        FileSnapshot { files }
    }

    pub fn put_back(&self) {
        use std::io::Write;
        for (p, data) in &self.files {
            let mut f = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
            f.write_all(data)
                .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
    }
}

/// A running cryo process whose output goes to files.
pub struct CryoRun {
    pid: i32,
    child: Option<std::process::Child>,
    args: Vec<String>,
    out: PathBuf,
    err: PathBuf,
}

fn run_files() -> (PathBuf, PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let base = format!("/tmp/cryo-run-{}-{n}", std::process::id());
    (
        PathBuf::from(format!("{base}.out")),
        PathBuf::from(format!("{base}.err")),
    )
}

/// Starts cryo with `args` and extra environment `env`. `CRYO_FAULT` is
/// removed from the inherited environment unless `env` sets it. Output goes
/// to files, not pipes, so that a leaked descriptor cannot hang the harness.
pub fn spawn_cryo<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> CryoRun {
    let bin = cryo_bin();
    let (out, err) = run_files();
    let fo = File::create(&out).expect("create cryo stdout file");
    let fe = File::create(&err).expect("create cryo stderr file");
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(fo)
        .stderr(fe)
        .env_remove("CRYO_FAULT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    CryoRun {
        pid: child.id() as i32,
        child: Some(child),
        args: args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect(),
        out,
        err,
    }
}

impl CryoRun {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The command line, for messages.
    pub fn describe(&self) -> String {
        format!("cryo {}", self.args.join(" "))
    }

    /// What cryo wrote to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn collect(&mut self, status: ExitStatus) -> Output {
        let stdout = std::fs::read(&self.out).unwrap_or_default();
        let stderr = std::fs::read(&self.err).unwrap_or_default();
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Waits for cryo to exit. On timeout cryo is killed by its pid and an
    /// error describing the hang is returned.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Output, String> {
        let start = Instant::now();
        let Some(child) = self.child.as_mut() else {
            return Err("cryo was already waited for".into());
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Ok(self.collect(status));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("wait for {}: {e}", self.describe())),
            }
            if start.elapsed() > timeout {
                let err = self.stderr_so_far();
                self.kill();
                return Err(format!(
                    "{} did not finish within {timeout:?} (hang); killed it. stderr:\n{err}",
                    self.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs cryo by its pid and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill by the pid of the child we spawned and have not reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for CryoRun {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
    }
}

/// Runs cryo to completion with a timeout; Err if it hung (it is killed).
pub fn try_run_cryo<S: AsRef<OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Output, String> {
    spawn_cryo(args, env).wait_timeout(timeout)
}

/// Runs cryo to completion; panics if it does not finish within
/// [`CRYO_TIMEOUT`] (after killing it).
pub fn run_cryo<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    try_run_cryo(args, env, CRYO_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Panics with cryo's output unless it exited with status 0.
pub fn assert_cryo_ok(out: &Output, what: &str) {
    let err = stderr_of(out);
    assert!(
        out.status.success(),
        "{what}: cryo failed with {}\nstderr:\n{err}\nstdout:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !err.contains("panicked at"),
        "{what}: cryo panicked:\n{err}"
    );
}

/// Checks that cryo failed cleanly: non-zero exit, a message on stderr, no
/// Rust panic. Returns a description of what is wrong, if anything.
pub fn check_cryo_failed_cleanly(out: &Output) -> Result<(), String> {
    let err = stderr_of(out);
    if out.status.success() {
        return Err(format!("cryo exited with status 0; stderr: {err:?}"));
    }
    if out.status.code().is_none() {
        return Err(format!(
            "cryo was killed by a signal ({}); stderr: {err:?}",
            out.status
        ));
    }
    if err.contains("panicked at") {
        return Err(format!("cryo panicked: {err:?}"));
    }
    if err.trim().is_empty() {
        return Err("cryo failed without a message on stderr".into());
    }
    Ok(())
}

/// The verdict of a workload.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub text: String,
    pub exit: Exit,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.text.trim() == "PASS" && matches!(self.exit, Exit::Code(0) | Exit::Unknown)
    }
}

/// Sends SIGTERM to `pid`, waits up to [`VERDICT_TIMEOUT`] for it to exit
/// (reaping it: the original is our child, a restored one was reparented to
/// us as subreaper) and reads the verdict file. Err describes a hang or a
/// missing verdict.
pub fn terminate_and_verdict(pid: i32, verdict: &Path) -> Result<Verdict, String> {
    // SAFETY: kill by an explicit, positive pid of the workload under test.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(format!(
            "kill({pid}, SIGTERM): {}",
            std::io::Error::last_os_error()
        ));
    }
    let exit = match wait_exit(pid, VERDICT_TIMEOUT) {
        Some(e) => e,
        None => {
            kill_and_reap(pid);
            return Err(format!(
                "pid {pid} did not exit within {VERDICT_TIMEOUT:?} after SIGTERM; killed it"
            ));
        }
    };
    match std::fs::read_to_string(verdict) {
        Ok(text) => Ok(Verdict { text, exit }),
        Err(e) => Err(format!(
            "pid {pid} exited ({exit:?}) without a verdict ({}: {e})",
            verdict.display()
        )),
    }
}

/// A workload process under test.
pub struct Workload {
    pid: i32,
    name: String,
    ready: PathBuf,
    verdict: PathBuf,
    log: PathBuf,
    /// False once the process is known to be gone (reaped or dumped and killed).
    running: bool,
}

impl Workload {
    /// Starts bin `name` with `--ready <dir>/ready --verdict <dir>/verdict`
    /// followed by `args`; stdin is /dev/null, stdout and stderr share one
    /// O_APPEND description of `<dir>/log`. Becomes a child subreaper first.
    /// Waits for the ready file.
    pub fn start(name: &str, args: &[&str], dir: &TestDir) -> Workload {
        become_subreaper();
        let ready = dir.join("ready");
        let verdict = dir.join("verdict");
        let log = dir.join("log");
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(&verdict);
        let lf = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let lf2 = lf.try_clone().expect("dup log fd");
        let bin = workload_bin(name);
        let child = Command::new(&bin)
            .arg("--ready")
            .arg(&ready)
            .arg("--verdict")
            .arg(&verdict)
            .args(args)
            .stdin(Stdio::null())
            .stdout(lf)
            .stderr(lf2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut wl = Workload {
            pid: child.id() as i32,
            name: name.to_string(),
            ready,
            verdict,
            log,
            running: true,
        };
        // The Child is dropped: we wait for the pid ourselves (std does not
        // reap on drop).
        drop(child);
        wl.wait_ready();
        wl
    }

    /// `wl_single` with `--wait <wait> --tmp <dir>/tmp`.
    pub fn single(wait: &str, dir: &TestDir) -> Workload {
        Workload::single_with(wait, dir, &[])
    }

    /// `wl_single` with `--wait <wait> --tmp <dir>/tmp` and more arguments
    /// (`--drop-creds`, `--thread`).
    pub fn single_with(wait: &str, dir: &TestDir, extra: &[&str]) -> Workload {
        let tmp = dir.subdir("tmp");
        let tmp = tmp.to_str().expect("utf-8 temp path").to_string();
        let mut args = vec!["--wait", wait, "--tmp", &tmp];
        args.extend_from_slice(extra);
        Workload::start("wl_single", &args, dir)
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while !self.ready.exists() {
            if let Some(e) = try_reap(self.pid) {
                self.running = false;
                panic!(
                    "{} (pid {}) exited ({e:?}) before it was ready\nverdict: {}\nlog:\n{}",
                    self.name,
                    self.pid,
                    std::fs::read_to_string(&self.verdict).unwrap_or_default(),
                    self.log_text()
                );
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "{} (pid {}) not ready within {READY_TIMEOUT:?}\nlog:\n{}",
                    self.name,
                    self.pid,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn verdict_path(&self) -> &Path {
        &self.verdict
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// After a dump in kill mode: the process must be gone. Reaps it (it is
    /// our child or was reparented to us) and asserts its pid is free.
    pub fn assert_gone_after_dump(&mut self) {
        match wait_exit(self.pid, Duration::from_secs(10)) {
            Some(_) => self.running = false,
            None => panic!(
                "pid {} still alive 10 s after the dump (kill mode)",
                self.pid
            ),
        }
        assert!(
            !pid_alive(self.pid),
            "pid {} still alive after the dump",
            self.pid
        );
    }

    /// After `cryo restore -d` succeeded: the same pid must run the workload again.
    pub fn assert_restored(&mut self) {
        self.running = true;
        assert!(
            pid_alive(self.pid),
            "pid {} not alive after restore\nlog:\n{}",
            self.pid,
            self.log_text()
        );
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let want = workload_bin(&self.name).display().to_string();
        assert_eq!(
            exe, want,
            "pid {} runs {exe:?} after restore, expected the workload",
            self.pid
        );
    }

    /// Marks the workload as running again (a restore that the caller checks itself).
    pub fn mark_running(&mut self) {
        self.running = true;
    }

    /// SIGTERM, wait, read the verdict.
    pub fn terminate_and_verdict(&mut self) -> Result<Verdict, String> {
        let r = terminate_and_verdict(self.pid, &self.verdict);
        self.running = false;
        let _ = std::fs::remove_file(&self.ready);
        r
    }

    /// SIGTERM, wait, and panic with the verdict and log unless it is PASS
    /// with exit status 0.
    pub fn assert_pass(&mut self, what: &str) {
        match self.terminate_and_verdict() {
            Ok(v) if v.passed() => {
                // Start the next cycle with no verdict file.
                let _ = std::fs::remove_file(&self.verdict);
            }
            Ok(v) => panic!(
                "{what}: verdict {:?}, exit {:?}\nlog:\n{}",
                v.text,
                v.exit,
                self.log_text()
            ),
            Err(e) => panic!("{what}: {e}\nlog:\n{}", self.log_text()),
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if self.running {
            kill_and_reap(self.pid);
        } else {
            // A restore may have brought it back without the test noticing.
            let _ = try_reap(self.pid);
        }
    }
}

mod cycle;
pub use cycle::*;
