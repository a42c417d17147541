//! bench: the cryo benchmark.
//!
//! Usage: `bench [--mib N] [--dir DIR] [--runs K] [--keep]`
//!
//! In one run it measures, on fresh `wl_bench` workloads of N MiB (default
//! 512):
//!   a. `cryo dump` (kill mode, zstd): wall time, image size;
//!   b. `cryo restore -d` of that image after dropping the page cache: wall
//!      time; then the restored task gets SIGTERM and must write `PASS`;
//!   c. `cryo dump -R --stats` (zstd): how long the task was stopped; the
//!      original must still pass afterwards;
//!   d. a and b with `--compress none`;
//!   e. baselines: writing the same N MiB to a file next to the images
//!      (write + close, no fsync), reading it back into fresh memory after
//!      dropping the page cache, and copying it in memory.
//!
//! With `--runs K` every figure is the median of K runs. The work files go
//! into `DIR/cryo-bench-<pid>` (DIR defaults to /tmp), removed at the end
//! unless `--keep`. The benchmark only reports; it exits non-zero only when
//! a step fails (a cryo error, a verdict other than PASS, a workload that
//! does not start).
//!
//! cryo is taken from the directory of this executable, else `$CRYO_BIN`;
//! wl_bench from the directory of this executable. Must run as root (cryo
//! needs it, and so does dropping the page cache).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
const CRYO_TIMEOUT: Duration = Duration::from_secs(300);
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const VERDICT_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// CRIU 4.2 on this machine, 512 MiB workload.
const CRIU_DUMP_MS: f64 = 340.0;
const CRIU_RESTORE_MS: (f64, f64) = (1000.0, 1400.0);
const CRIU_IMAGE_MIB: f64 = 513.0;
const CRIU_STOPPED_MS: (f64, f64) = (250.0, 280.0);
const CRIU_REF_MIB: usize = 512;

/// Every workload pid this process started (or restored). Cleanup kills
/// those that are still our live children.
static PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static CACHES_WARNED: AtomicBool = AtomicBool::new(false);
static CACHES_OK: AtomicBool = AtomicBool::new(true);

use cryo_tests::benchdata::*;
use cryo_tests::pid_alive;

// ---------------------------------------------------------------------------
// Options and environment.

struct Opts {
    mib: usize,
    dir: PathBuf,
    runs: usize,
    keep: bool,
}

fn usage() -> ! {
    eprintln!("usage: bench [--mib N] [--dir DIR] [--runs K] [--keep]");
    std::process::exit(2);
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        mib: 512,
        dir: PathBuf::from("/tmp"),
        runs: 1,
        keep: false,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{} needs a value", a.to_string_lossy()))
        };
        let num = |v: OsString, max: usize| -> Result<usize, String> {
            v.to_str()
                .and_then(|s| s.parse().ok())
                .filter(|&n: &usize| (1..=max).contains(&n))
                .ok_or_else(|| format!("bad value {v:?} for {}", a.to_string_lossy()))
        };
        match a.to_str() {
            Some("--mib") => o.mib = num(val()?, 1 << 20)?,
            Some("--runs") => o.runs = num(val()?, 1000)?,
            Some("--dir") => o.dir = PathBuf::from(val()?),
            Some("--keep") => o.keep = true,
            Some("-h") | Some("--help") => usage(),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(o)
}

struct Env {
    cryo: PathBuf,
    wl: PathBuf,
    /// `DIR/cryo-bench-<pid>`.
    work: PathBuf,
    mib: usize,
    /// Does cryo accept `--stats`?
    stats: bool,
    /// Keep the images (`--keep`).
    keep: bool,
}

fn exe_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} has no parent directory", exe.display()))
}

fn find_cryo(dir: &Path) -> Result<PathBuf, String> {
    let p = dir.join("cryo");
    if p.is_file() {
        return Ok(p);
    }
    if let Some(e) = std::env::var_os("CRYO_BIN") {
        let e = PathBuf::from(e);
        if e.is_file() {
            return Ok(e);
        }
        return Err(format!("$CRYO_BIN {} is not a file", e.display()));
    }
    Err(format!(
        "cryo not found at {} and $CRYO_BIN is not set (cargo build --release)",
        p.display()
    ))
}

fn errstr() -> String {
    std::io::Error::last_os_error().to_string()
}

fn become_subreaper() -> Result<(), String> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument and only
    // changes an attribute of this process.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        return Err(format!("prctl(PR_SET_CHILD_SUBREAPER): {}", errstr()));
    }
    Ok(())
}

/// File system type of `dir`, for the header.
fn fs_type(dir: &Path) -> String {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return "?".into();
    };
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return format!("? ({})", errstr());
    }
    match st.f_type as u64 {
        0xEF53 => "ext2/3/4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs (page cache drops have no effect!)".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        t => format!("fs magic {t:#x}"),
    }
}

/// sync, then drop the page cache. A failure is reported once and the
/// figures are marked as taken with a warm cache.
fn drop_caches() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    let r = OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .and_then(|mut f| f.write_all(b"3\n"));
    if let Err(e) = r {
        CACHES_OK.store(false, Ordering::SeqCst);
        if !CACHES_WARNED.swap(true, Ordering::SeqCst) {
            eprintln!("bench: warning: cannot drop the page cache ({e}); restore/read times are with a warm cache");
        }
    }
}

fn sync() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
}

// ---------------------------------------------------------------------------
// Processes.

fn register_pid(pid: i32) {
    if let Ok(mut v) = PIDS.lock() {
        if !v.contains(&pid) {
            v.push(pid);
        }
    }
}

/// waitpid(pid, WNOHANG): Ok(Some(status)) if it was reaped now, Ok(None) if
/// it is our live child, Err(errno) otherwise (ECHILD: not our child).
fn try_wait(pid: i32) -> Result<Option<i32>, i32> {
    let mut status = 0;
    // SAFETY: status is a valid out pointer; WNOHANG never blocks.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid {
        Ok(Some(status))
    } else if r == 0 {
        Ok(None)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

/// Waits until `pid` has ended: reaps it if it is our child, otherwise polls
/// /proc. Ok(Some(status)) for a reaped child, Ok(None) for a non-child that
/// is gone, Err on timeout.
fn wait_gone(pid: i32, timeout: Duration) -> Result<Option<i32>, String> {
    let start = Instant::now();
    loop {
        match try_wait(pid) {
            Ok(Some(st)) => return Ok(Some(st)),
            Ok(None) => {}
            Err(_) => {
                if !pid_alive(pid) {
                    return Ok(None);
                }
            }
        }
        if start.elapsed() > timeout {
            return Err(format!("task {pid} still alive after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills (SIGKILL) and reaps every registered pid that is still our live
/// child. Pids that are not our children are left alone: after they were
/// reaped the number may belong to an unrelated process.
fn kill_leftovers() {
    let pids = PIDS.lock().map(|v| v.clone()).unwrap_or_default();
    for pid in pids {
        if try_wait(pid) == Ok(None) {
            eprintln!("bench: killing leftover workload {pid}");
            // SAFETY: kill by an explicit positive pid that is our own live
            // (unreaped) child, so it cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_gone(pid, EXIT_TIMEOUT);
        }
    }
}

/// A started workload.
struct Workload {
    pid: i32,
    dir: PathBuf,
    checksum: u64,
}

impl Workload {
    fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }
    fn verdict(&self) -> PathBuf {
        self.dir.join("verdict")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("log")
    }
    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

fn parse_checksum(ready: &str) -> Option<u64> {
    let v = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("checksum="))?;
    u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

/// Starts a fresh wl_bench in `dir` and waits for its ready file.
fn start_workload(env: &Env, dir: &Path) -> Result<Workload, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .map_err(|e| format!("create log in {}: {e}", dir.display()))?;
    let log2 = log.try_clone().map_err(|e| format!("dup log: {e}"))?;
    let child = Command::new(&env.wl)
        .arg("--mib")
        .arg(env.mib.to_string())
        .arg("--ready")
        .arg(dir.join("ready"))
        .arg("--verdict")
        .arg(dir.join("verdict"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", env.wl.display()))?;
    let pid = child.id() as i32;
    // The child is waited for with waitpid by pid from now on.
    drop(child);
    register_pid(pid);
    let mut w = Workload {
        pid,
        dir: dir.to_path_buf(),
        checksum: 0,
    };
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(w.ready()) {
            w.checksum = parse_checksum(&s)
                .ok_or_else(|| format!("workload {pid}: bad ready file {s:?}"))?;
            return Ok(w);
        }
        if let Ok(Some(st)) = try_wait(pid) {
            return Err(format!(
                "workload {pid} ended before it was ready ({}); log:\n{}",
                describe_status(st),
                w.log_tail()
            ));
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(format!("workload {pid} not ready after {READY_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends SIGTERM to the workload (original or restored) and returns its
/// verdict: Ok for `PASS`, Err with the verdict / problem otherwise.
fn finish_workload(w: &Workload, what: &str) -> Result<(), String> {
    if !pid_alive(w.pid) {
        return Err(format!("{what}: task {} is not running", w.pid));
    }
    // SAFETY: kill by an explicit positive pid: our workload, checked alive
    // just above (and our child or reparented to us, so not yet reaped).
    if unsafe { libc::kill(w.pid, libc::SIGTERM) } != 0 {
        return Err(format!("{what}: kill({}, SIGTERM): {}", w.pid, errstr()));
    }
    let st = wait_gone(w.pid, VERDICT_TIMEOUT).map_err(|e| format!("{what}: {e}"))?;
    let verdict =
        std::fs::read_to_string(w.verdict()).unwrap_or_else(|e| format!("<no verdict: {e}>"));
    let status = st
        .map(describe_status)
        .unwrap_or_else(|| "not our child".into());
    if verdict.trim() == "PASS" {
        println!("    {what}: verdict PASS ({status})");
        Ok(())
    } else {
        Err(format!(
            "{what}: verdict of task {} ({status}):\n{}\nlog:\n{}",
            w.pid,
            verdict.trim_end(),
            w.log_tail()
        ))
    }
}

/// One finished cryo command.
struct CryoRun {
    wall_ms: f64,
    ok: bool,
    status: String,
    stderr: String,
}

fn run_cryo_once(env: &Env, args: &[OsString], tag: &str) -> Result<CryoRun, String> {
    let out_path = env.work.join(format!("{tag}.cryo.out"));
    let err_path = env.work.join(format!("{tag}.cryo.err"));
    let out = File::create(&out_path).map_err(|e| format!("create {}: {e}", out_path.display()))?;
    let err = File::create(&err_path).map_err(|e| format!("create {}: {e}", err_path.display()))?;
    let start = Instant::now();
    let child = Command::new(&env.cryo)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", env.cryo.display()))?;
    let pid = child.id() as i32;
    drop(child);
    // A watchdog kills a hung cryo. It only signals while the pid is
    // unreaped: the main thread waits with WNOWAIT and stops the watchdog
    // before reaping.
    let (tx, rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(CRYO_TIMEOUT) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: pid is cryo, our child, not reaped before this thread
            // is joined (see above).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let waited = loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid out pointer; WNOWAIT leaves the child
        // unreaped.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            break Err(format!("waitid(cryo {pid}): {e}"));
        }
    };
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let _ = tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    waited?;
    let mut status = 0;
    // SAFETY: status is a valid out pointer; the child has exited, so this
    // does not block.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let ok = !timed_out && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let status = if timed_out {
        format!("killed after {CRYO_TIMEOUT:?}")
    } else {
        describe_status(status)
    };
    Ok(CryoRun {
        wall_ms,
        ok,
        status,
        stderr,
    })
}

fn cmdline(args: &[OsString]) -> String {
    let v: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("cryo {}", v.join(" "))
}

/// Runs cryo; a failure is an error carrying its stderr.
fn run_cryo(env: &Env, args: &[OsString], tag: &str) -> Result<CryoRun, String> {
    let r = run_cryo_once(env, args, tag)?;
    if !r.ok {
        return Err(format!(
            "`{}` failed ({}), stderr:\n{}",
            cmdline(args),
            r.status,
            r.stderr.trim_end()
        ));
    }
    Ok(r)
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

/// What `--stats` reports.
#[derive(Clone, Copy, Default)]
struct Stats {
    frozen_ms: f64,
    total_ms: f64,
    image_bytes: f64,
    pages_stored: f64,
    zero_pages: f64,
}

/// The number after `"key":` in a flat JSON object.
fn json_num(s: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\"");
    let i = s.find(&pat)? + pat.len();
    let rest = s[i..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn parse_stats(s: &str) -> Result<Stats, String> {
    let get = |k: &str| json_num(s, k).ok_or_else(|| format!("no {k:?} in stats {s:?}"));
    Ok(Stats {
        frozen_ms: get("frozen_ms")?,
        total_ms: get("total_ms")?,
        image_bytes: get("image_bytes")?,
        pages_stored: get("pages_stored")?,
        zero_pages: get("zero_pages")?,
    })
}

/// One dump: wall time, stats if cryo supports them.
struct Dump {
    wall_ms: f64,
    stats: Option<Stats>,
}

/// `cryo dump -t PID -D img [-R] [--compress C] [--stats FILE]`. If cryo
/// does not know `--stats` (an argument error, before it touches the task),
/// it is run again without it and later dumps skip it.
fn dump(
    env: &mut Env,
    w: &Workload,
    img: &Path,
    extra: &[&str],
    tag: &str,
) -> Result<Dump, String> {
    let stats_path = env.work.join(format!("{tag}.stats.json"));
    let _ = std::fs::remove_file(&stats_path);
    let mut args = vec![
        os("dump"),
        os("-t"),
        os(w.pid.to_string()),
        os("-D"),
        os(img),
    ];
    args.extend(extra.iter().map(os));
    if env.stats {
        let mut a = args.clone();
        a.push(os("--stats"));
        a.push(os(&stats_path));
        let r = run_cryo_once(env, &a, tag)?;
        if r.ok {
            let s = std::fs::read_to_string(&stats_path)
                .map_err(|e| format!("`{}`: read {}: {e}", cmdline(&a), stats_path.display()))?;
            return Ok(Dump {
                wall_ms: r.wall_ms,
                stats: Some(parse_stats(&s)?),
            });
        }
        let unknown = r.stderr.contains("--stats")
            && (r.stderr.contains("unexpected argument") || r.stderr.contains("unrecognized"));
        if !unknown {
            return Err(format!(
                "`{}` failed ({}), stderr:\n{}",
                cmdline(&a),
                r.status,
                r.stderr.trim_end()
            ));
        }
        eprintln!("bench: cryo does not support --stats; stop times and page counts are n/a");
        env.stats = false;
    }
    let r = run_cryo(env, &args, tag)?;
    Ok(Dump {
        wall_ms: r.wall_ms,
        stats: None,
    })
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &Path) -> Result<u64, String> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(|e| format!("read_dir {}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("read_dir {}: {e}", dir.display()))?;
        let md = e
            .metadata()
            .map_err(|x| format!("stat {}: {x}", e.path().display()))?;
        if md.is_dir() {
            total += dir_bytes(&e.path())?;
        } else {
            total += md.len();
        }
    }
    Ok(total)
}

/// After a kill-mode dump the task must be gone: reap it so that its pid is
/// free for the restore.
fn reap_dumped(w: &Workload) -> Result<(), String> {
    match wait_gone(w.pid, EXIT_TIMEOUT) {
        Ok(Some(st)) if libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL => Ok(()),
        Ok(Some(st)) => {
            println!(
                "    note: dumped task {} ended with {} (expected SIGKILL)",
                w.pid,
                describe_status(st)
            );
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(_) => Err(format!(
            "cryo dump (kill mode) returned but task {} is still alive",
            w.pid
        )),
    }
}

/// Restores `img` after dropping the page cache; returns the wall time.
/// The restored task is checked and terminated by the caller.
fn restore(env: &Env, w: &Workload, img: &Path, tag: &str) -> Result<f64, String> {
    drop_caches();
    register_pid(w.pid);
    let args = vec![os("restore"), os("-D"), os(img), os("-d")];
    let r = run_cryo(env, &args, tag)?;
    match try_wait(w.pid) {
        Ok(None) => {}
        Ok(Some(st)) => {
            return Err(format!(
                "restored task {} ended right after the restore ({}); log:\n{}",
                w.pid,
                describe_status(st),
                w.log_tail()
            ))
        }
        Err(_) if pid_alive(w.pid) => println!(
            "    note: restored task {} is not our child (subreaper not honoured?)",
            w.pid
        ),
        Err(_) => return Err(format!("no task {} after `{}`", w.pid, cmdline(&args))),
    }
    Ok(r.wall_ms)
}

// ---------------------------------------------------------------------------
// The steps.

/// Figures of one run, by name.
type Figures = BTreeMap<String, f64>;

fn mib_of(bytes: f64) -> f64 {
    bytes / MIB as f64
}

fn put_stats(f: &mut Figures, prefix: &str, s: &Option<Stats>) {
    let Some(s) = s else { return };
    for (k, v) in [
        ("frozen_ms", s.frozen_ms),
        ("total_ms", s.total_ms),
        ("stats_bytes", s.image_bytes),
        ("pages_stored", s.pages_stored),
        ("zero_pages", s.zero_pages),
    ] {
        f.insert(format!("{prefix}.{k}"), v);
    }
}

/// Steps a/b, d and f: kill-mode dump (figures under `compress`, cryo
/// given `args`), restore, verdict.
fn dump_restore(
    env: &mut Env,
    run_dir: &Path,
    compress: &'static str,
    args: &[&str],
    f: &mut Figures,
    checksums: &mut Vec<u64>,
) -> Result<(), String> {
    let wdir = run_dir.join(format!("wl-{compress}"));
    let img = run_dir.join(format!("img-{compress}"));
    let w = start_workload(env, &wdir)?;
    checksums.push(w.checksum);
    sync();
    let d = dump(env, &w, &img, args, &format!("dump-{compress}"))?;
    reap_dumped(&w)?;
    let bytes = dir_bytes(&img)?;
    println!(
        "    dump {} of {}: {:.1} ms, image {:.1} MiB{}",
        args.join(" "),
        w.pid,
        d.wall_ms,
        mib_of(bytes as f64),
        d.stats
            .map(|s| format!(
                ", stopped {:.1} ms, {} zero pages",
                s.frozen_ms, s.zero_pages
            ))
            .unwrap_or_default()
    );
    f.insert(format!("{compress}.dump_ms"), d.wall_ms);
    f.insert(format!("{compress}.image_bytes"), bytes as f64);
    put_stats(f, compress, &d.stats);
    let ms = restore(env, &w, &img, &format!("restore-{compress}"))?;
    println!("    restore of {}: {ms:.1} ms (page cache dropped)", w.pid);
    f.insert(format!("{compress}.restore_ms"), ms);
    finish_workload(&w, &format!("restored task ({compress})"))?;
    if !env.keep {
        let _ = std::fs::remove_dir_all(&img);
    }
    Ok(())
}

/// Step c: leave-running dump with stats, then the original's verdict.
fn dump_leave_running(
    env: &mut Env,
    run_dir: &Path,
    f: &mut Figures,
    checksums: &mut Vec<u64>,
) -> Result<(), String> {
    let w = start_workload(env, &run_dir.join("wl-r"))?;
    checksums.push(w.checksum);
    let img = run_dir.join("img-r");
    sync();
    let d = dump(env, &w, &img, &["-R"], "dump-r")?;
    let bytes = dir_bytes(&img)?;
    println!(
        "    dump -R of {}: {:.1} ms, image {:.1} MiB, stopped {}",
        w.pid,
        d.wall_ms,
        mib_of(bytes as f64),
        d.stats
            .map(|s| format!("{:.1} ms", s.frozen_ms))
            .unwrap_or_else(|| "n/a".into())
    );
    f.insert("r.dump_ms".into(), d.wall_ms);
    put_stats(f, "r", &d.stats);
    finish_workload(&w, "original after dump -R")?;
    if !env.keep {
        let _ = std::fs::remove_dir_all(&img);
    }
    Ok(())
}

/// Step e: baselines on the same content.
fn baseline(run_dir: &Path, content: &[u8], f: &mut Figures) -> Result<(), String> {
    let path = run_dir.join("baseline.raw");
    sync();
    let t = Instant::now();
    {
        let mut file =
            File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        file.write_all(content)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let write_ms = t.elapsed().as_secs_f64() * 1e3;

    drop_caches();
    let t = Instant::now();
    // A zeroed Vec of this size is a fresh mapping: reading into it faults
    // its pages in, as a restore must.
    let mut back = vec![0u8; content.len()];
    File::open(&path)
        .and_then(|mut file| file.read_exact(&mut back))
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    let read_ms = t.elapsed().as_secs_f64() * 1e3;
    if back != content {
        return Err(format!("baseline: {} read back differs", path.display()));
    }
    drop(back);

    let t = Instant::now();
    let mut copy = vec![0u8; content.len()];
    copy.copy_from_slice(content);
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(&copy);
    drop(copy);

    let _ = std::fs::remove_file(&path);
    println!(
        "    baseline: write {write_ms:.1} ms, read (cache dropped) {read_ms:.1} ms, memcpy {copy_ms:.1} ms"
    );
    f.insert("base.write_ms".into(), write_ms);
    f.insert("base.read_ms".into(), read_ms);
    f.insert("base.copy_ms".into(), copy_ms);
    Ok(())
}

fn one_run(env: &mut Env, n: usize, content: &[u8], expect: u64) -> Result<Figures, String> {
    let run_dir = env.work.join(format!("run{n}"));
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("mkdir {}: {e}", run_dir.display()))?;
    let mut f = Figures::new();
    let mut sums = Vec::new();
    println!("run {}:", n + 1);
    dump_restore(
        env,
        &run_dir,
        "zstd",
        &["--compress", "zstd"],
        &mut f,
        &mut sums,
    )?;
    dump_leave_running(env, &run_dir, &mut f, &mut sums)?;
    dump_restore(
        env,
        &run_dir,
        "none",
        &["--compress", "none"],
        &mut f,
        &mut sums,
    )?;
    dump_restore(env, &run_dir, "pre", &["--pre-copy"], &mut f, &mut sums)?;
    if let Some(s) = sums.iter().find(|&&s| s != expect) {
        return Err(format!(
            "a workload reported checksum {s:#018x}, the bench generated {expect:#018x}: \
             the generators of bench.rs and wl_bench.rs differ"
        ));
    }
    baseline(&run_dir, content, &mut f)?;
    if !env.keep {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(f)
}

// ---------------------------------------------------------------------------
// Report.

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians (and min, max) over the runs of every figure present in all runs.
fn summarize(runs: &[Figures]) -> BTreeMap<String, (f64, f64, f64)> {
    let mut out = BTreeMap::new();
    let Some(first) = runs.first() else {
        return out;
    };
    for k in first.keys() {
        let mut v: Vec<f64> = runs.iter().filter_map(|f| f.get(k).copied()).collect();
        if v.len() != runs.len() {
            continue;
        }
        let m = median(&mut v);
        out.insert(k.clone(), (m, v[0], v[v.len() - 1]));
    }
    out
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1} ms"))
        .unwrap_or_else(|| "n/a".into())
}

fn fmt_mib(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1} MiB", mib_of(x)))
        .unwrap_or_else(|| "n/a".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// cryo against a reference range (lo, hi): "a/hi - a/lo".
fn ratio_range(a: Option<f64>, r: (f64, f64)) -> String {
    match a {
        Some(a) => format!("{:.2}-{:.2}x", a / r.1, a / r.0),
        None => "n/a".into(),
    }
}

struct Row {
    name: String,
    cryo: String,
    base: String,
    base_ratio: String,
    criu: String,
    criu_ratio: String,
}

fn print_table(rows: &[Row]) {
    let head = Row {
        name: "figure".into(),
        cryo: "cryo".into(),
        base: "baseline".into(),
        base_ratio: "cryo/base".into(),
        criu: "CRIU 4.2".into(),
        criu_ratio: "cryo/CRIU".into(),
    };
    let all: Vec<&Row> = std::iter::once(&head).chain(rows).collect();
    let w = |f: fn(&Row) -> &String| all.iter().map(|r| f(r).len()).max().unwrap_or(0);
    let w0 = w(|r| &r.name);
    let w1 = w(|r| &r.cryo);
    let w2 = w(|r| &r.base);
    let w3 = w(|r| &r.base_ratio);
    let w4 = w(|r| &r.criu);
    let w5 = w(|r| &r.criu_ratio);
    let line = |r: &Row| {
        println!(
            "| {:<w0$} | {:>w1$} | {:>w2$} | {:>w3$} | {:>w4$} | {:>w5$} |",
            r.name, r.cryo, r.base, r.base_ratio, r.criu, r.criu_ratio
        )
    };
    line(&head);
    println!(
        "|{}|{}|{}|{}|{}|{}|",
        "-".repeat(w0 + 2),
        "-".repeat(w1 + 2),
        "-".repeat(w2 + 2),
        "-".repeat(w3 + 2),
        "-".repeat(w4 + 2),
        "-".repeat(w5 + 2)
    );
    for r in rows {
        line(r);
    }
}

fn report(opts: &Opts, runs: &[Figures]) {
    let s = summarize(runs);
    let g = |k: &str| s.get(k).map(|v| v.0);
    let criu_ok = opts.mib == CRIU_REF_MIB;
    let raw = (opts.mib * MIB) as f64;
    let criu = |text: String, r: String| -> (String, String) {
        if criu_ok {
            (text, r)
        } else {
            (text, "n/a*".into())
        }
    };
    let mut rows = Vec::new();
    let mut row = |name: &str, cryo: String, base: String, br: String, c: (String, String)| {
        rows.push(Row {
            name: name.into(),
            cryo,
            base,
            base_ratio: br,
            criu: c.0,
            criu_ratio: c.1,
        })
    };
    let base_write = g("base.write_ms");
    let base_read = g("base.read_ms");
    for label in ["zstd", "none"] {
        let dump = g(&format!("{label}.dump_ms"));
        let rest = g(&format!("{label}.restore_ms"));
        let img = g(&format!("{label}.image_bytes"));
        row(
            &format!("dump time, {label} (kill)"),
            fmt_ms(dump),
            format!("{} (write)", fmt_ms(base_write)),
            ratio(dump, base_write),
            criu(
                format!("{CRIU_DUMP_MS:.0} ms"),
                ratio(dump, Some(CRIU_DUMP_MS)),
            ),
        );
        row(
            &format!("restore time, {label}"),
            fmt_ms(rest),
            format!("{} (read)", fmt_ms(base_read)),
            ratio(rest, base_read),
            criu(
                format!(
                    "{:.1}-{:.1} s",
                    CRIU_RESTORE_MS.0 / 1e3,
                    CRIU_RESTORE_MS.1 / 1e3
                ),
                ratio_range(rest, CRIU_RESTORE_MS),
            ),
        );
        row(
            &format!("image size, {label}"),
            fmt_mib(img),
            format!("{} (raw)", fmt_mib(Some(raw))),
            ratio(img, Some(raw)),
            criu(
                format!("{CRIU_IMAGE_MIB:.0} MiB"),
                ratio(img, Some(CRIU_IMAGE_MIB * MIB as f64)),
            ),
        );
    }
    let base_copy = g("base.copy_ms");
    let frozen = g("r.frozen_ms");
    row(
        "task stopped, dump -R zstd",
        fmt_ms(frozen),
        format!("{} (memcpy)", fmt_ms(base_copy)),
        ratio(frozen, base_copy),
        criu(
            format!("{:.0}-{:.0} ms", CRIU_STOPPED_MS.0, CRIU_STOPPED_MS.1),
            ratio_range(frozen, CRIU_STOPPED_MS),
        ),
    );
    let rdump = g("r.dump_ms");
    row(
        "dump time, zstd (-R)",
        fmt_ms(rdump),
        format!("{} (write)", fmt_ms(base_write)),
        ratio(rdump, base_write),
        ("-".into(), "-".into()),
    );
    let pfrozen = g("pre.frozen_ms");
    row(
        "task stopped, --pre-copy (kill)",
        fmt_ms(pfrozen),
        format!("{} (memcpy)", fmt_ms(base_copy)),
        ratio(pfrozen, base_copy),
        criu(
            format!("{CRIU_DUMP_MS:.0} ms (dump)"),
            ratio(pfrozen, Some(CRIU_DUMP_MS)),
        ),
    );
    let pdump = g("pre.dump_ms");
    row(
        "dump time, --pre-copy (kill)",
        fmt_ms(pdump),
        format!("{} (write)", fmt_ms(base_write)),
        ratio(pdump, base_write),
        ("-".into(), "-".into()),
    );

    println!();
    println!(
        "results ({} MiB, {}{}):",
        opts.mib,
        if runs.len() > 1 {
            format!("median of {} runs", runs.len())
        } else {
            "1 run".into()
        },
        if CACHES_OK.load(Ordering::SeqCst) {
            ""
        } else {
            ", page cache NOT dropped"
        }
    );
    print_table(&rows);
    println!();
    if !criu_ok {
        println!(
            "* the CRIU reference numbers were measured with {CRIU_REF_MIB} MiB; no ratio for {} MiB",
            opts.mib
        );
    }
    println!("baselines: write = write(2) of the same bytes to a file next to the images + close, no fsync;");
    println!("           read = read back into fresh memory after sync + drop_caches; memcpy = copy into fresh memory.");
    println!("cryo times are wall times of the cryo command; restore after sync + drop_caches; 'task stopped' is cryo's frozen_ms.");
    let zero_expect = opts.mib * MIB / 4 / PAGE;
    for k in ["zstd", "none"] {
        let (zp, ps, fr, tot) = (
            g(&format!("{k}.zero_pages")),
            g(&format!("{k}.pages_stored")),
            g(&format!("{k}.frozen_ms")),
            g(&format!("{k}.total_ms")),
        );
        let n = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "n/a".into());
        println!(
            "{k:>4} dump: zero pages skipped {} (the workload has {zero_expect}), pages stored {}, \
             stopped {} in kill mode, cryo's own total {}",
            n(zp),
            n(ps),
            fmt_ms(fr),
            fmt_ms(tot)
        );
    }
    let zimg = g("zstd.image_bytes");
    println!(
        "compression ratio ({} MiB / zstd image): {}; none image / raw: {}",
        opts.mib,
        ratio(Some(raw), zimg),
        ratio(g("none.image_bytes"), Some(raw))
    );
    if runs.len() > 1 {
        println!("spread over {} runs (min - max):", runs.len());
        for (k, (_, lo, hi)) in &s {
            if k.ends_with("_ms") {
                println!("  {k:<18} {lo:>9.1} - {hi:>9.1} ms");
            } else if k.ends_with("bytes") {
                println!("  {k:<18} {:>9.1} - {:>9.1} MiB", mib_of(*lo), mib_of(*hi));
            }
        }
    }
}

// ---------------------------------------------------------------------------

fn bench(opts: &Opts, work: &Path) -> Result<(), String> {
    let dir = exe_dir()?;
    let cryo = find_cryo(&dir)?;
    let wl = dir.join("wl_bench");
    if !wl.is_file() {
        return Err(format!(
            "{} not found (cargo build --release -p cryo-tests --bins)",
            wl.display()
        ));
    }
    become_subreaper()?;
    let mut env = Env {
        cryo,
        wl,
        work: work.to_path_buf(),
        mib: opts.mib,
        stats: true,
        keep: opts.keep,
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "cryo benchmark: {} MiB workload, {} run(s); cryo {}; work dir {} ({}); kernel {}, {} CPUs",
        opts.mib,
        opts.runs,
        env.cryo.display(),
        work.display(),
        fs_type(work),
        kernel.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let len = opts.mib * MIB;
    let t = Instant::now();
    let mut content = vec![0u8; len];
    Gen::new(len).fill(&mut content);
    let mut sum = Sum::new();
    sum.update(&content);
    let expect = sum.finish();
    println!(
        "generated the {} MiB of content in {:.1} ms (checksum {expect:#018x})",
        opts.mib,
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut runs = Vec::new();
    for n in 0..opts.runs {
        runs.push(one_run(&mut env, n, &content, expect)?);
    }
    drop(content);
    report(opts, &runs);
    Ok(())
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            usage();
        }
    };
    let work = opts.dir.join(format!("cryo-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("bench: mkdir {}: {e}", work.display());
        std::process::exit(1);
    }
    let work = std::fs::canonicalize(&work).unwrap_or(work);
    let res = std::panic::catch_unwind(|| bench(&opts, &work));
    kill_leftovers();
    let code = match res {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("bench: FAILED: {e}");
            1
        }
        Err(_) => {
            eprintln!("bench: FAILED: panic");
            1
        }
    };
    if opts.keep {
        println!("work files kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    std::process::exit(code);
}
