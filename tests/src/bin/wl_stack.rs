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

use std::path::PathBuf;
use std::sync::atomic::Ordering;

const PAGE: usize = 4096;
const STEP_NS: libc::c_long = 50_000_000;

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
    log(
        "wl_stack",
        &format!("SIGTERM after {step} steps, {bad} bad pages"),
    );
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

use cryo_tests::wl::{close_extra_fds, finish, install_term_handler, log, write_atomic, TERM};

fn main() {
    close_extra_fds();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            log("wl_stack", &e);
            std::process::exit(2);
        }
    };
    finish(
        "wl_stack",
        &args.verdict,
        install_term_handler().and_then(|()| level_one(&args)),
    )
}
