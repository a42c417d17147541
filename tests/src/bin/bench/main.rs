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
//!   d. a and b with `--compress none`, and with `--compress fast`;
//!   e. baselines: writing the same N MiB to a file next to the images
//!      (write + close, no fsync), reading it back into fresh memory after
//!      dropping the page cache, and copying it in memory;
//!   f. a small container (`wl_mntns`) dumped and restored, against a
//!      plain 4 MiB process (see `container`);
//!   g. `cryo migrate` to a `cryo page-server --restore` over loopback
//!      TCP: stop time, total time and bytes sent, against a plain copy of
//!      the same memory over a loopback TCP connection (see `migrate`).
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

mod container;
mod migrate;
mod procs;
mod report;

use procs::*;
use report::report;

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
        "fast",
        &["--compress", "fast"],
        &mut f,
        &mut sums,
    )?;
    dump_restore(
        env,
        &run_dir,
        "none",
        &["--compress", "none"],
        &mut f,
        &mut sums,
    )?;
    dump_restore(env, &run_dir, "pre", &["--pre-copy"], &mut f, &mut sums)?;
    container::small_container(env, &run_dir, &mut f)?;
    if let Some(s) = sums.iter().find(|&&s| s != expect) {
        return Err(format!(
            "a workload reported checksum {s:#018x}, the bench generated {expect:#018x}: \
             the generators of bench.rs and wl_bench.rs differ"
        ));
    }
    baseline(&run_dir, content, &mut f)?;
    migrate::migration(env, &run_dir, content, &mut f)?;
    if !env.keep {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(f)
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
