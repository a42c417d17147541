//! wl_stack: a workload whose stack shows its own function names, for
//! `cryo image core` (a debugger's backtrace of the core file must show
//! `level_three` <- `level_two` <- `level_one` <- `main`).
//!
//! Usage: `wl_stack --ready PATH --verdict PATH [--heap-mib N]`
//!
//! `main` calls `level_one`, which calls `level_two`, which calls
//! `level_three`; that one sleeps in 50 ms nanosleep steps until SIGTERM. With
//! `--heap-mib N` it also allocates an N MiB heap buffer and, every step,
//! writes the step counter into the next page of it (wrapping around), so
//! that two checkpoints taken apart differ in some of its pages.
//!
//! The ready file (tmp + rename) reads `ready pid=<pid> buf=<addr> bytes=<len>`
//! (`buf=0x0 bytes=0` without `--heap-mib`). On SIGTERM it checks that the
//! buffer holds what it wrote and writes `PASS` or `FAIL: ...` to the verdict
//! file (exit 0 on pass, 1 on fail).
//!
//! Stdin must be /dev/null and stdout/stderr a regular file; every other
//! descriptor is closed at startup. No threads, no children.

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const PAGE: usize = 4096;
const STEP_NS: libc::c_long = 50_000_000;

static TERM: AtomicBool = AtomicBool::new(false);

struct Args {
    ready: PathBuf,
    verdict: PathBuf,
    heap_mib: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut ready = None;
    let mut verdict = None;
    let mut heap_mib = 0usize;
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{} needs a value", a.to_string_lossy()))
        };
        match a.to_str() {
            Some("--ready") => ready = Some(PathBuf::from(val()?)),
            Some("--verdict") => verdict = Some(PathBuf::from(val()?)),
            Some("--heap-mib") => {
                let v = val()?;
                heap_mib = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|&n: &usize| n <= 1024)
                    .ok_or_else(|| format!("bad --heap-mib {v:?}"))?;
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(Args {
        ready: ready.ok_or("--ready is required")?,
        verdict: verdict.ok_or("--verdict is required")?,
        heap_mib,
    })
}

fn log(msg: &str) {
    let line = format!("wl_stack[{}]: {msg}\n", std::process::id());
    let data = line.as_bytes();
    let mut off = 0;
    while off < data.len() {
        // SAFETY: the source is the unwritten tail of `data`, of exactly the
        // length given; fd 1 is our stdout.
        let r = unsafe { libc::write(1, data[off..].as_ptr().cast(), data.len() - off) };
        if r <= 0 {
            if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        off += r as usize;
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Closes every descriptor above 2 (cryo refuses other open fds).
fn close_extra_fds() {
    // SAFETY: close_range only closes descriptors of this process; nothing
    // in this single-threaded program holds descriptors above 2 yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
}

extern "C" fn on_term(_sig: c_int) {
    TERM.store(true, Ordering::SeqCst);
}

fn install_term_handler() -> Result<(), String> {
    // SAFETY: sigaction is plain data; zeroed is a valid (empty) value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_term as extern "C" fn(c_int) as usize;
    // SAFETY: act.sa_mask is a valid sigset_t owned here.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: act is fully initialised; on_term is an async-signal-safe
    // extern "C" fn(c_int), the handler signature without SA_SIGINFO.
    if unsafe { libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "sigaction(SIGTERM): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn sleep_step() {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: STEP_NS,
    };
    // SAFETY: ts is a valid timespec; a null remainder is allowed. EINTR
    // (SIGTERM) simply ends the step early.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// The word written at the start of page `page` of the buffer at `step`.
fn stamp(step: u64, page: usize) -> u64 {
    0x5354_4143_4b00_0000 ^ (step << 20) ^ page as u64
}

/// The innermost frame: sleeps (and stamps the buffer) until SIGTERM.
/// Returns the failures found when checking the buffer afterwards.
#[inline(never)]
fn level_three(buf: &mut [u8]) -> Vec<String> {
    let pages = buf.len() / PAGE;
    // Expected first word of every page (0 = never written).
    let mut expect = vec![0u64; pages];
    let mut step = 0u64;
    while !TERM.load(Ordering::SeqCst) {
        if pages > 0 {
            let p = (step as usize) % pages;
            let w = stamp(step, p);
            buf[p * PAGE..p * PAGE + 8].copy_from_slice(&w.to_le_bytes());
            expect[p] = w;
            std::hint::black_box(&mut *buf);
        }
        sleep_step();
        step += 1;
    }
    let buf = std::hint::black_box(&*buf);
    let bad = (0..pages)
        .filter(|&p| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&buf[p * PAGE..p * PAGE + 8]);
            u64::from_le_bytes(w) != expect[p]
        })
        .count();
    log(&format!("SIGTERM after {step} steps, {bad} bad pages"));
    if bad > 0 {
        vec![format!(
            "{bad} of {pages} buffer pages do not hold what was written"
        )]
    } else {
        Vec::new()
    }
}

#[inline(never)]
fn level_two(buf: &mut [u8]) -> Vec<String> {
    let r = level_three(std::hint::black_box(buf));
    std::hint::black_box(r)
}

#[inline(never)]
fn level_one(args: &Args) -> Result<Vec<String>, String> {
    let len = args.heap_mib << 20;
    let mut buf = vec![0u8; len];
    let ready = format!(
        "ready pid={} buf={:#x} bytes={len}\n",
        std::process::id(),
        buf.as_ptr() as usize
    );
    write_atomic(&args.ready, ready.as_bytes())
        .map_err(|e| format!("write ready file {}: {e}", args.ready.display()))?;
    let r = level_two(std::hint::black_box(&mut buf));
    Ok(std::hint::black_box(r))
}

fn main() {
    close_extra_fds();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            log(&e);
            std::process::exit(2);
        }
    };
    let res = install_term_handler().and_then(|()| level_one(&args));
    let fails = match res {
        Ok(f) => f,
        Err(e) => {
            log(&format!("setup failed: {e}"));
            let _ = write_atomic(&args.verdict, format!("FAIL: setup: {e}\n").as_bytes());
            std::process::exit(2);
        }
    };
    let verdict = if fails.is_empty() {
        "PASS\n".to_string()
    } else {
        fails.iter().map(|f| format!("FAIL: {f}\n")).collect()
    };
    if let Err(e) = write_atomic(&args.verdict, verdict.as_bytes()) {
        log(&format!("cannot write verdict: {e}"));
        std::process::exit(2);
    }
    std::process::exit(if fails.is_empty() { 0 } else { 1 });
}
