//! The small-container step: `wl_mntns` (two processes in a mount
//! namespace of their own, a copy of the host's with a tmpfs of files,
//! binds that are peers and slaves, a read-only tmpfs) dumped and
//! restored, against a plain process of a few MiB (`wl_bench --mib 4`)
//! dumped and restored the same way in the same run: what the namespace
//! costs.

use super::*;

/// The plain process's size.
const SMALL_MIB: usize = 4;

/// Starts wl_mntns in `dir` (its mounts under `dir/m`) and waits for it.
fn start_container(dir: &Path) -> Result<Workload, String> {
    let wl = exe_dir()?.join("wl_mntns");
    let base = dir.join("m");
    std::fs::create_dir_all(&base).map_err(|e| format!("mkdir {}: {e}", base.display()))?;
    let log =
        File::create(dir.join("log")).map_err(|e| format!("log in {}: {e}", dir.display()))?;
    let child = Command::new(&wl)
        .arg("--ready")
        .arg(dir.join("ready"))
        .arg("--verdict")
        .arg(dir.join("verdict"))
        .arg("--tmp")
        .arg(&base)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", wl.display()))?;
    let pid = child.id() as i32;
    drop(child);
    register_pid(pid);
    let w = Workload {
        pid,
        dir: dir.to_path_buf(),
        checksum: 0,
    };
    let start = Instant::now();
    while !w.ready().exists() {
        if let Ok(Some(st)) = try_wait(pid) {
            return Err(format!(
                "wl_mntns ended before it was ready ({})",
                describe_status(st)
            ));
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(format!("wl_mntns {pid} not ready after {READY_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(w)
}

/// Dump (kill mode) and restore of `w`, its verdict after: the figures
/// `{key}.dump_ms` and `{key}.restore_ms`.
fn cycle(env: &Env, w: &Workload, img: &Path, key: &str, f: &mut Figures) -> Result<(), String> {
    let (ds, rs) = (
        env.work.join(format!("{key}-dump.stats.json")),
        env.work.join(format!("{key}-restore.stats.json")),
    );
    let mut args = vec![
        os("dump"),
        os("-t"),
        os(w.pid.to_string()),
        os("-D"),
        os(img),
    ];
    if env.stats {
        args.extend([os("--stats"), os(&ds)]);
    }
    let d = run_cryo(env, &args, &format!("{key}-dump"))?;
    reap_dumped(w)?;
    reap_orphans();
    let extra = match env.stats {
        true => vec![os("--stats"), os(&rs)],
        false => Vec::new(),
    };
    let r = restore_with(env, w, img, &format!("{key}-restore"), &extra)?;
    finish_workload(w, &format!("{key} restored"))?;
    f.insert(format!("{key}.dump_ms"), d.wall_ms);
    f.insert(format!("{key}.restore_ms"), r);
    println!("  {key}: dump {:.1} ms, restore {r:.1} ms", d.wall_ms);
    // Where the time of a small tree goes (the fixed costs).
    for (what, path) in [("dump", &ds), ("restore", &rs)] {
        if let Some(p) = std::fs::read_to_string(path).ok().and_then(|s| phases(&s)) {
            println!("    {what} phases (ms, cryo's own clock): {p}");
        }
    }
    Ok(())
}

/// "seize 0.4, capture 2.0, ..." from a --stats file's phases_ms.
fn phases(stats: &str) -> Option<String> {
    let at = stats.find("\"phases_ms\":{")? + "\"phases_ms\":{".len();
    let body = &stats[at..at + stats[at..].find('}')?];
    let parts: Vec<String> = body
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            let ms: f64 = v.trim().parse().ok()?;
            Some(format!("{} {ms:.1}", k.trim().trim_matches('"')))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The dumped tree's other processes, ours once their parent died (the
/// benchmark is a subreaper; nothing else of it runs now): reaped, so that
/// their pids are free for the restore.
fn reap_orphans() {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let mut st = 0;
        // SAFETY: waitpid of any child of ours, without blocking.
        match unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) } {
            -1 => return,
            0 => std::thread::sleep(Duration::from_millis(2)),
            _ => {}
        }
    }
}

/// The step: the container, then the plain small process.
pub(super) fn small_container(env: &Env, run_dir: &Path, f: &mut Figures) -> Result<(), String> {
    let dir = run_dir.join("container");
    let w = start_container(&dir)?;
    cycle(env, &w, &dir.join("img"), "ctr", f)?;
    let small = Env {
        cryo: env.cryo.clone(),
        wl: env.wl.clone(),
        work: env.work.clone(),
        mib: SMALL_MIB,
        stats: env.stats,
        keep: env.keep,
    };
    let dir = run_dir.join("small");
    let w = start_workload(&small, &dir)?;
    cycle(&small, &w, &dir.join("img"), "small", f)
}

/// The step's lines of the report.
pub(super) fn report(g: &dyn Fn(&str) -> Option<f64>) {
    let (cd, cr) = (g("ctr.dump_ms"), g("ctr.restore_ms"));
    let (sd, sr) = (g("small.dump_ms"), g("small.restore_ms"));
    let (Some(cd), Some(cr), Some(sd), Some(sr)) = (cd, cr, sd, sr) else {
        return;
    };
    println!(
        "small container (wl_mntns: 2 processes in a mount namespace, 2 tmpfs, binds): \
         dump {cd:.1} ms, restore {cr:.1} ms; a plain {SMALL_MIB} MiB process: dump {sd:.1} ms, \
         restore {sr:.1} ms; container / plain: dump {:.2}x, restore {:.2}x",
        cd / sd,
        cr / sr
    );
}
