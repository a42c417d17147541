//! The benchmark's processes: the workloads it starts and waits for, and
//! the cryo commands it runs and times.

use super::*;

// ---------------------------------------------------------------------------
// Processes.

pub(super) fn register_pid(pid: i32) {
    if let Ok(mut v) = PIDS.lock() {
        if !v.contains(&pid) {
            v.push(pid);
        }
    }
}

/// waitpid(pid, WNOHANG): Ok(Some(status)) if it was reaped now, Ok(None) if
/// it is our live child, Err(errno) otherwise (ECHILD: not our child).
pub(super) fn try_wait(pid: i32) -> Result<Option<i32>, i32> {
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

pub(super) fn describe_status(status: i32) -> String {
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
pub(super) fn wait_gone(pid: i32, timeout: Duration) -> Result<Option<i32>, String> {
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
pub(super) fn kill_leftovers() {
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
pub(super) struct Workload {
    pub(super) pid: i32,
    pub(super) dir: PathBuf,
    pub(super) checksum: u64,
}

impl Workload {
    pub(super) fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }
    pub(super) fn verdict(&self) -> PathBuf {
        self.dir.join("verdict")
    }
    pub(super) fn log(&self) -> PathBuf {
        self.dir.join("log")
    }
    pub(super) fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

pub(super) fn parse_checksum(ready: &str) -> Option<u64> {
    let v = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("checksum="))?;
    u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

/// Starts a fresh wl_bench in `dir` and waits for its ready file.
pub(super) fn start_workload(env: &Env, dir: &Path) -> Result<Workload, String> {
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
pub(super) fn finish_workload(w: &Workload, what: &str) -> Result<(), String> {
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
pub(super) struct CryoRun {
    pub(super) wall_ms: f64,
    pub(super) ok: bool,
    pub(super) status: String,
    pub(super) stderr: String,
}

pub(super) fn run_cryo_once(env: &Env, args: &[OsString], tag: &str) -> Result<CryoRun, String> {
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

pub(super) fn cmdline(args: &[OsString]) -> String {
    let v: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("cryo {}", v.join(" "))
}

/// Runs cryo; a failure is an error carrying its stderr.
pub(super) fn run_cryo(env: &Env, args: &[OsString], tag: &str) -> Result<CryoRun, String> {
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

pub(super) fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

/// What `--stats` reports.
#[derive(Clone, Copy, Default)]
pub(super) struct Stats {
    pub(super) frozen_ms: f64,
    pub(super) total_ms: f64,
    pub(super) image_bytes: f64,
    pub(super) pages_stored: f64,
    pub(super) zero_pages: f64,
}

/// The number after `"key":` in a flat JSON object.
pub(super) fn json_num(s: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\"");
    let i = s.find(&pat)? + pat.len();
    let rest = s[i..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub(super) fn parse_stats(s: &str) -> Result<Stats, String> {
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
pub(super) struct Dump {
    pub(super) wall_ms: f64,
    pub(super) stats: Option<Stats>,
}

/// `cryo dump -t PID -D img [-R] [--compress C] [--stats FILE]`. If cryo
/// does not know `--stats` (an argument error, before it touches the task),
/// it is run again without it and later dumps skip it.
pub(super) fn dump(
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
pub(super) fn dir_bytes(dir: &Path) -> Result<u64, String> {
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
pub(super) fn reap_dumped(w: &Workload) -> Result<(), String> {
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
pub(super) fn restore(env: &Env, w: &Workload, img: &Path, tag: &str) -> Result<f64, String> {
    restore_with(env, w, img, tag, &[])
}

/// [`restore`] with `extra` arguments.
pub(super) fn restore_with(
    env: &Env,
    w: &Workload,
    img: &Path,
    tag: &str,
    extra: &[OsString],
) -> Result<f64, String> {
    drop_caches();
    register_pid(w.pid);
    let mut args = vec![os("restore"), os("-D"), os(img), os("-d")];
    args.extend(extra.iter().cloned());
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
