//! wl_bench: the memory workload of the cryo benchmark (`bench`).
//!
//! Usage: `wl_bench --ready PATH --verdict PATH [--mib N] [--rewrite]`
//!
//! It maps N MiB (default 512) of anonymous private memory and fills it:
//! the first quarter with pseudo-random bytes, the next half with 64-byte
//! "log records" (compressible, but not trivially), the last quarter with
//! zeros written to every byte (so those pages are present). It checksums the
//! area, writes `ready pid=.. checksum=0x.. ...` to the ready file (tmp +
//! rename), then sleeps in 50 ms steps until SIGTERM. On SIGTERM it checksums
//! the area again and writes `PASS` or `FAIL: ...` lines to the verdict file
//! (exit 0 on pass, 1 on fail).
//!
//! `--rewrite` rewrites one page (the first page of the records) on every
//! step; that page is then checked against the rewrite counter instead of
//! the checksum.
//!
//! The content generator is duplicated in `bench.rs` (the baseline writes
//! the same bytes); the two must stay identical: the benchmark compares its
//! checksum with the one in the ready file.
//!
//! Stdin must be /dev/null and stdout/stderr a regular file; every other
//! descriptor is closed at startup. No threads, no children.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
const STEP_NS: libc::c_long = 50_000_000;

/// Number of completed rewrites of the rewrite page (`--rewrite`).
static REWRITES: AtomicU64 = AtomicU64::new(0);

use cryo_tests::benchdata::*;

// ---------------------------------------------------------------------------

struct Args {
    ready: PathBuf,
    verdict: PathBuf,
    mib: usize,
    rewrite: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut ready = None;
    let mut verdict = None;
    let mut mib = 512usize;
    let mut rewrite = false;
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{} needs a value", a.to_string_lossy()))
        };
        match a.to_str() {
            Some("--ready") => ready = Some(PathBuf::from(val()?)),
            Some("--verdict") => verdict = Some(PathBuf::from(val()?)),
            Some("--mib") => {
                let v = val()?;
                mib = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|&n: &usize| (1..=1 << 20).contains(&n))
                    .ok_or_else(|| format!("bad --mib {v:?}"))?;
            }
            Some("--rewrite") => rewrite = true,
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(Args {
        ready: ready.ok_or("--ready is required")?,
        verdict: verdict.ok_or("--verdict is required")?,
        mib,
        rewrite,
    })
}

fn errstr() -> String {
    std::io::Error::last_os_error().to_string()
}

/// The area: one anonymous private mapping, never unmapped.
struct Area {
    ptr: *mut u8,
    len: usize,
}

impl Area {
    fn map(len: usize) -> Result<Area, String> {
        // SAFETY: mmap with a null hint and without MAP_FIXED never replaces
        // an existing mapping; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {len} bytes: {}", errstr()));
        }
        Ok(Area { ptr: p.cast(), len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is a readable and writable mapping of len bytes that is
        // never unmapped; the program is single-threaded and never holds a
        // mutable slice of it while this shared one is alive (the signal
        // handler does not touch it).
        let s = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        // The memory may be replaced behind the compiler's back (that is the
        // point of the test): never let it reuse earlier reads.
        std::hint::black_box(s)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in bytes(); &mut self guarantees no other slice of the
        // area is alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Byte range of the page rewritten in `--rewrite` mode: the first page of
/// the records.
fn rewrite_range(len: usize) -> (usize, usize) {
    let q = len / 4;
    (q, q + PAGE)
}

fn rewrite_word(n: u64, i: usize) -> u64 {
    n.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Checksum of the area, without the byte range `skip` if given.
fn checksum(area: &[u8], skip: Option<(usize, usize)>) -> u64 {
    let mut s = Sum::new();
    match skip {
        Some((a, b)) => {
            s.update(&area[..a]);
            s.update(&area[b..]);
        }
        None => s.update(area),
    }
    s.finish()
}

fn region_name(off: usize, len: usize) -> &'static str {
    let q = len / 4;
    if off < q {
        "random"
    } else if off < 3 * q {
        "records"
    } else {
        "zeros"
    }
}

/// Compares the area with freshly generated content; describes the
/// differences (first offset, number of differing pages per region).
fn locate_differences(area: &[u8], skip: Option<(usize, usize)>) -> String {
    let len = area.len();
    let mut gen = Gen::new(len);
    let mut buf = vec![0u8; MIB];
    let mut first = None;
    let mut bad_pages = [0usize; 3];
    for (ci, chunk) in area.chunks(MIB).enumerate() {
        let want = &mut buf[..chunk.len()];
        gen.fill(want);
        for (pi, (got, exp)) in chunk.chunks(PAGE).zip(want.chunks(PAGE)).enumerate() {
            let off = ci * MIB + pi * PAGE;
            if skip.is_some_and(|(a, b)| off >= a && off < b) || got == exp {
                continue;
            }
            let i = got.iter().zip(exp).position(|(x, y)| x != y).unwrap_or(0);
            first.get_or_insert((off + i, got[i], exp[i]));
            let r = match region_name(off, len) {
                "random" => 0,
                "records" => 1,
                _ => 2,
            };
            bad_pages[r] += 1;
        }
    }
    match first {
        None => "content matches the generator (checksum code broken?)".to_string(),
        Some((off, got, exp)) => format!(
            "first difference at offset {off:#x} ({} region): {got:#04x}, expected {exp:#04x}; \
             differing pages: random {}, records {}, zeros {}",
            region_name(off, len),
            bad_pages[0],
            bad_pages[1],
            bad_pages[2]
        ),
    }
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

fn run(args: &Args) -> Result<Vec<String>, String> {
    let len = args.mib * MIB;
    let mut area = Area::map(len)?;
    let t = Instant::now();
    Gen::new(len).fill(area.bytes_mut());
    let fill_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let full = checksum(area.bytes(), None);
    let sum_ms = t.elapsed().as_secs_f64() * 1e3;
    let skip = args.rewrite.then(|| rewrite_range(len));
    let before = if skip.is_some() {
        checksum(area.bytes(), skip)
    } else {
        full
    };
    log(
        "wl_bench",
        &format!(
            "{} MiB at {:#x} filled in {fill_ms:.1} ms, checksum {full:#018x} in {sum_ms:.1} ms{}",
            args.mib,
            area.ptr as usize,
            if args.rewrite { ", rewrite mode" } else { "" }
        ),
    );
    let ready = format!(
        "ready pid={} checksum={full:#018x} addr={:#x} bytes={len}\n",
        std::process::id(),
        area.ptr as usize
    );
    write_atomic(&args.ready, ready.as_bytes())
        .map_err(|e| format!("write ready file {}: {e}", args.ready.display()))?;

    let mut steps = 0u64;
    while !TERM.load(Ordering::SeqCst) {
        if let Some((a, b)) = skip {
            let n = REWRITES.load(Ordering::SeqCst) + 1;
            for (i, w) in area.bytes_mut()[a..b].chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&rewrite_word(n, i).to_le_bytes());
            }
            REWRITES.store(n, Ordering::SeqCst);
        }
        sleep_step();
        steps += 1;
    }

    let mut fails = Vec::new();
    let t = Instant::now();
    let after = checksum(area.bytes(), skip);
    let sum_ms = t.elapsed().as_secs_f64() * 1e3;
    if after != before {
        fails.push(format!(
            "checksum {after:#018x}, expected {before:#018x}: {}",
            locate_differences(area.bytes(), skip)
        ));
    }
    if let Some((a, b)) = skip {
        let n = REWRITES.load(Ordering::SeqCst);
        let bad = area.bytes()[a..b]
            .chunks_exact(8)
            .enumerate()
            .filter(|(i, w)| **w != rewrite_word(n, *i).to_le_bytes())
            .count();
        if n > 0 && bad > 0 {
            fails.push(format!(
                "rewrite page: {bad} words do not match rewrite {n}"
            ));
        }
    }
    log(
        "wl_bench",
        &format!(
            "SIGTERM after {steps} steps, checksum {after:#018x} in {sum_ms:.1} ms, {} failures",
            fails.len()
        ),
    );
    Ok(fails)
}

use cryo_tests::wl::{close_extra_fds, finish, install_term_handler, log, write_atomic, TERM};

fn main() {
    close_extra_fds();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            log("wl_bench", &e);
            std::process::exit(2);
        }
    };
    finish(
        "wl_bench",
        &args.verdict,
        install_term_handler().and_then(|()| run(&args)),
    )
}
