//! wl_sweep: a workload that rewrites its memory without pause, to check
//! that a dump stores the memory of one instant although the task keeps
//! writing (and changing its memory map) while cryo copies it.
//!
//! Usage: `wl_sweep --ready FILE --verdict FILE [--mib N] [--threads T]
//! [--discard M] [--thp 1] [--pace US] [--mremap P] [--remap P]
//! [--mprotect P] [--protnone P] [--redo P] [--forker 1] [--tree 1]
//! [--child-life MS]`
//!
//! Each of T threads (default 1) maps N MiB (default 32) of private
//! anonymous memory of its own and sweeps over it page by page for ever:
//! generation g writes g into the first word of every page (and a value
//! derived from g into its last word), in order, after checking that the
//! page still holds what the previous sweep wrote. Before each page it
//! records in a cursor (generation, page) where it is. Every 32nd page is
//! written by the kernel, through read(2) from a pipe, the others by a
//! plain store.
//!
//! A copy of the memory taken at one instant always satisfies the check
//! (pages before the cursor hold g, the rest g - 1), so a restored process
//! carries on sweeping without a failure. A copy taken while the task ran,
//! page by page, holds pages of different generations on both sides of
//! the cursor, and the restored process fails within two sweeps.
//!
//! Variations, each one more sweeper of P pages that changes its memory
//! map as it goes (so cryo meets the change while it copies):
//! - `--mremap P`: after every sweep the area moves (mremap) to the other
//!   of two places, and back after the next;
//! - `--remap P`: after every sweep the area is unmapped and mapped anew
//!   at the same address (the next sweep expects zeros, then writes);
//! - `--mprotect P`: every 64 pages, the next 64 are made read-only, read,
//!   and made writable again before they are written;
//! - `--protnone P`: the same with PROT_NONE (the pages cannot be read
//!   meanwhile);
//! - `--redo P`: each page is discarded (MADV_DONTNEED) just before it is
//!   rewritten with the next generation.
//!
//! Other options: `--thp 1` aligns every area to 2 MiB and asks for
//! transparent huge pages (MADV_HUGEPAGE) before its first write;
//! `--pace US` sleeps US microseconds every 64 pages; `--discard M` one
//! more thread fills M MiB of its own and discards them (MADV_DONTNEED)
//! over and over, as allocators do with memory they free; `--forker 1`
//! one more thread forks children over and over that scribble over their
//! copy-on-write copy of the first sweeper's area and exit at once; `--tree
//! 1` the process sweeps its first area once, then forks a child that
//! sweeps on in its copy-on-write copy while the parent does the same in
//! its own (use `--pace` so that pages stay shared for a while); the
//! child's checks count in the verdict; `--child-life MS` the child
//! checks its area and exits on its own after MS ms.
//!
//! The ready file reads `ready pid=<pid>` once every sweeper has done its
//! first sweep. On SIGTERM each checks its whole area against its cursor
//! and the verdict file gets `PASS` or `FAIL: ...` lines (exit 0 on pass).

use cryo_tests::wl;
use std::sync::atomic::{AtomicUsize, Ordering};

const NAME: &str = "wl_sweep";
const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
/// Mixed into the last word of each page.
const TAIL: u64 = 0x5eed_0000_5eed_0000;

/// Where a sweep is: written before each page.
#[repr(C)]
struct Cursor {
    gen: u64,
    page: u64,
    /// The sweep follows a new mapping: the pages ahead hold zeros.
    fresh: u64,
}

/// Sweepers that have finished their first sweep.
static SWEPT: AtomicUsize = AtomicUsize::new(0);
/// The first sweeper's area and its length, for the forker's children.
static FIRST_AREA: AtomicUsize = AtomicUsize::new(0);
static FIRST_LEN: AtomicUsize = AtomicUsize::new(0);

/// What one sweeper does besides sweeping.
#[derive(Clone, Copy, Default)]
struct Mode {
    pages: usize,
    thp: bool,
    mremap: bool,
    remap: bool,
    mprotect: bool,
    protnone: bool,
    redo: bool,
    pace_us: u64,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn tail(v: u64) -> u64 {
    if v == 0 {
        0
    } else {
        v ^ TAIL
    }
}

/// mmap with an address hint or MAP_FIXED*; Err names `what`.
fn map(at: usize, len: usize, prot: i32, flags: i32, what: &str) -> Result<usize, String> {
    // SAFETY: anonymous memory only; callers pass MAP_FIXED only over
    // ranges this sweeper owns (its reservation), MAP_FIXED_NOREPLACE
    // never replaces anything.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err(what));
    }
    Ok(p as usize)
}

/// A new read-write area at `at` (in a hole or over this sweeper's own
/// reservation), with huge pages asked for.
fn map_area(at: usize, len: usize, thp: bool, flags: i32) -> Result<(), String> {
    map(
        at,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
        "mmap area",
    )?;
    // SAFETY: advice on the mapping just made.
    if thp && unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
        return Err(os_err("madvise(MADV_HUGEPAGE)"));
    }
    Ok(())
}

/// The pipe through which the kernel writes every 32nd page.
fn new_pipe() -> Result<[i32; 2], String> {
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `pipe`.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe2"));
    }
    Ok(pipe)
}

struct Sweeper {
    m: Mode,
    len: usize,
    /// The area, and with --mremap the other place it moves to (kept
    /// reserved PROT_NONE while the area is elsewhere).
    base: usize,
    other: usize,
    cursor: *mut Cursor,
    pipe: [i32; 2],
    gen: u64,
    fresh: bool,
}

// SAFETY: the raw pointers point into mappings this sweeper owns; it is
// used by one thread at a time (moved into it).
unsafe impl Send for Sweeper {}

impl Sweeper {
    fn new(m: Mode) -> Result<Sweeper, String> {
        let len = m.pages * PAGE;
        let align = if m.thp { HUGE } else { PAGE };
        let slots = if m.mremap { 2 } else { 1 };
        // A reservation with room to align the area(s).
        let res = map(
            0,
            slots * len + align,
            libc::PROT_NONE,
            libc::MAP_NORESERVE,
            "mmap reservation",
        )?;
        let base = res.div_ceil(align) * align;
        map_area(base, len, m.thp, libc::MAP_FIXED)?;
        let cursor = map(
            0,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            0,
            "mmap cursor",
        )? as *mut Cursor;
        Ok(Sweeper {
            m,
            len,
            base,
            other: base + len,
            cursor,
            pipe: new_pipe()?,
            gen: 1,
            fresh: true,
        })
    }

    fn first(&self, i: usize) -> *mut u64 {
        (self.base + i * PAGE) as *mut u64
    }

    fn last(&self, i: usize) -> *mut u64 {
        (self.base + (i + 1) * PAGE - 8) as *mut u64
    }

    fn read(&self, i: usize) -> (u64, u64) {
        // SAFETY: page i < pages lies in the area; volatile, since the
        // point is what memory holds.
        unsafe { (self.first(i).read_volatile(), self.last(i).read_volatile()) }
    }

    /// Sweep until SIGTERM (or one sweep with `once`); Err on a failed
    /// system call, failures of the check in the vector.
    fn run(&mut self, once: bool, fails: &mut Vec<String>) -> Result<(), String> {
        let pages = self.m.pages;
        'sweeps: loop {
            let gen = self.gen;
            let prev = if self.fresh { 0 } else { gen - 1 };
            for i in 0..pages {
                if (self.m.mprotect || self.m.protnone) && i % 64 == 0 {
                    let n = 64.min(pages - i);
                    let at = self.first(i) as *mut libc::c_void;
                    let prot = if self.m.protnone {
                        libc::PROT_NONE
                    } else {
                        libc::PROT_READ
                    };
                    // SAFETY: pages i..i+n of the area.
                    if unsafe { libc::mprotect(at, n * PAGE, prot) } != 0 {
                        return Err(os_err("mprotect(PROT_READ or PROT_NONE)"));
                    }
                    for k in (i..i + n).filter(|_| !self.m.protnone) {
                        if self.read(k) != (prev, tail(prev)) {
                            fails.push(format!(
                                "generation {gen}: page {k} (read-only) holds {:?}, expected {prev}",
                                self.read(k)
                            ));
                            break 'sweeps;
                        }
                    }
                    // SAFETY: as above.
                    if unsafe { libc::mprotect(at, n * PAGE, libc::PROT_READ | libc::PROT_WRITE) }
                        != 0
                    {
                        return Err(os_err("mprotect(PROT_READ|PROT_WRITE)"));
                    }
                }
                let have = self.read(i);
                if have != (prev, tail(prev)) {
                    fails.push(format!(
                        "generation {gen}: page {i} holds {have:?}, expected {prev} (the memory is not one instant's)"
                    ));
                    break 'sweeps;
                }
                // SAFETY: the cursor page is this sweeper's own mapping.
                unsafe {
                    std::ptr::addr_of_mut!((*self.cursor).gen).write_volatile(gen);
                    std::ptr::addr_of_mut!((*self.cursor).page).write_volatile(i as u64);
                    std::ptr::addr_of_mut!((*self.cursor).fresh).write_volatile(self.fresh as u64);
                }
                if self.m.redo {
                    // SAFETY: discarding one page of the area.
                    let r =
                        unsafe { libc::madvise(self.first(i).cast(), PAGE, libc::MADV_DONTNEED) };
                    if r != 0 {
                        return Err(os_err("madvise(MADV_DONTNEED)"));
                    }
                }
                if i % 32 == 0 {
                    let bytes = gen.to_ne_bytes();
                    // SAFETY: 8 bytes from `bytes` into our pipe, then 8
                    // bytes from the pipe into the first word of page i
                    // (inside the area): the kernel writes that page.
                    let ok = unsafe {
                        libc::write(self.pipe[1], bytes.as_ptr().cast(), 8) == 8
                            && libc::read(self.pipe[0], self.first(i).cast(), 8) == 8
                    };
                    if !ok {
                        return Err(os_err("pipe write/read"));
                    }
                } else {
                    // SAFETY: inside the area.
                    unsafe { self.first(i).write_volatile(gen) };
                }
                // SAFETY: inside the area.
                unsafe { self.last(i).write_volatile(tail(gen)) };
                if self.m.pace_us > 0 && i % 64 == 63 {
                    std::thread::sleep(std::time::Duration::from_micros(self.m.pace_us));
                }
                if wl::TERM.load(Ordering::SeqCst) {
                    break 'sweeps;
                }
            }
            if gen == 1 {
                SWEPT.fetch_add(1, Ordering::SeqCst);
            }
            self.gen += 1;
            self.fresh = false;
            if self.m.mremap {
                self.move_area()?;
            }
            if self.m.remap {
                // SAFETY: the area is this sweeper's own mapping.
                if unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) } != 0 {
                    return Err(os_err("munmap"));
                }
                map_area(self.base, self.len, self.m.thp, libc::MAP_FIXED_NOREPLACE)?;
                self.fresh = true;
            }
            if once {
                return Ok(());
            }
        }
        self.final_check(fails);
        Ok(())
    }

    /// Move the area to its other place, and reserve the one it leaves.
    /// MREMAP_DONTUNMAP leaves the old range mapped (empty): no hole opens
    /// that another mapping of this process could take before it is
    /// reserved again.
    fn move_area(&mut self) -> Result<(), String> {
        // SAFETY: moves this sweeper's area over its own reservation; the
        // old range stays mapped, emptied.
        let p = unsafe {
            libc::mremap(
                self.base as *mut libc::c_void,
                self.len,
                self.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                self.other as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mremap"));
        }
        // SAFETY: the range just left is this sweeper's own (now empty)
        // mapping: it becomes its reservation again.
        if unsafe { libc::mprotect(self.base as *mut libc::c_void, self.len, libc::PROT_NONE) } != 0
        {
            return Err(os_err("mprotect of the reservation"));
        }
        std::mem::swap(&mut self.base, &mut self.other);
        Ok(())
    }

    /// The whole area against the cursor.
    fn final_check(&self, fails: &mut Vec<String>) {
        if !fails.is_empty() {
            return;
        }
        // SAFETY: the cursor page is this sweeper's own mapping.
        let (g, at, fresh) = unsafe {
            (
                (*self.cursor).gen,
                (*self.cursor).page as usize,
                (*self.cursor).fresh != 0,
            )
        };
        let prev = if fresh { 0 } else { g - 1 };
        for i in 0..self.m.pages {
            let (f, l) = self.read(i);
            // The page under the cursor may hold either generation (or
            // zeros, discarded just before it is written).
            let ok = match i.cmp(&at) {
                std::cmp::Ordering::Less => (f, l) == (g, tail(g)),
                std::cmp::Ordering::Equal => {
                    [g, prev, 0].contains(&f) && [tail(g), tail(prev), 0].contains(&l)
                }
                std::cmp::Ordering::Greater => (f, l) == (prev, tail(prev)),
            };
            if !ok {
                fails.push(format!(
                    "at the end: page {i} holds {:?}; the cursor is at page {at} of generation {g}{}",
                    (f, l),
                    if fresh { " (fresh mapping)" } else { "" }
                ));
                break;
            }
        }
        wl::log(NAME, &format!("sweeper stopped in generation {g}"));
    }
}

fn sweep(mut s: Sweeper) -> Result<Vec<String>, String> {
    let mut fails = Vec::new();
    s.run(false, &mut fails)?;
    Ok(fails)
}

/// Fill `mib` MiB and discard them, again and again, until SIGTERM.
fn discard_loop(mib: usize) -> Result<(), String> {
    let len = mib << 20;
    let area = map(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        0,
        "mmap discard area",
    )?;
    let mut n = 0u8;
    while !wl::TERM.load(Ordering::SeqCst) {
        n = n.wrapping_add(1);
        // SAFETY: `area` is `len` bytes of our own mapping.
        unsafe { std::ptr::write_bytes(area as *mut u8, n | 1, len) };
        // SAFETY: discarding our own mapping's pages.
        if unsafe { libc::madvise(area as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
            return Err(os_err("madvise"));
        }
    }
    Ok(())
}

/// Fork children that scribble over their copy of the first sweeper's
/// area and exit at once, until SIGTERM.
fn fork_loop() -> Result<(), String> {
    let mut forks = 0u64;
    while !wl::TERM.load(Ordering::SeqCst) {
        // SAFETY: the child only stores into its copy-on-write copy of a
        // mapping of ours and calls _exit: nothing that needs the other
        // threads (no allocation, no locks).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(os_err("fork"));
        }
        if pid == 0 {
            let (base, len) = (
                FIRST_AREA.load(Ordering::SeqCst),
                FIRST_LEN.load(Ordering::SeqCst),
            );
            for off in (0..len).step_by(16 * PAGE) {
                // SAFETY: inside the child's copy of the first area.
                unsafe { ((base + off) as *mut u64).write_volatile(0xdead_beef) };
            }
            // SAFETY: ends the child without running anything of ours.
            unsafe { libc::_exit(0) };
        }
        forks += 1;
        let mut status = 0;
        let r = loop {
            // SAFETY: waits for the child just made.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break r;
            }
        };
        if r != pid {
            return Err(os_err(&format!("waitpid({pid})")));
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(format!("child {pid} ended with status {status:#x}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    wl::log(NAME, &format!("forked {forks} children"));
    Ok(())
}

fn num(a: &wl::Args, key: &str, default: &str) -> Result<usize, String> {
    a.get(key)
        .unwrap_or(default)
        .parse()
        .map_err(|_| format!("bad --{key}"))
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let mib = num(a, "mib", "32")?;
    let threads = num(a, "threads", "1")?;
    let discard = num(a, "discard", "0")?;
    let base = Mode {
        pages: mib * 256,
        thp: num(a, "thp", "0")? != 0,
        pace_us: num(a, "pace", "0")? as u64,
        ..Mode::default()
    };
    let mut modes = vec![base; threads];
    for (key, set) in [
        ("mremap", (|m: &mut Mode| m.mremap = true) as fn(&mut Mode)),
        ("remap", |m| m.remap = true),
        ("mprotect", |m| m.mprotect = true),
        ("protnone", |m| m.protnone = true),
        ("redo", |m| m.redo = true),
    ] {
        let pages = num(a, key, "0")?;
        if pages > 0 {
            let mut m = Mode { pages, ..base };
            set(&mut m);
            modes.push(m);
        }
    }
    let sweepers = modes.len();
    let mut first = Sweeper::new(modes[0])?;
    FIRST_AREA.store(first.base, Ordering::SeqCst);
    FIRST_LEN.store(first.len, Ordering::SeqCst);
    let mut fails = Vec::new();
    // --tree: one sweep, then a child sweeps on in its copy of the area.
    let child = if num(a, "tree", "0")? != 0 {
        first.run(true, &mut fails)?;
        // SAFETY: the process is single-threaded here (no thread started
        // yet); the child runs this program's own code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(os_err("fork"));
        }
        if pid == 0 {
            // A pipe of its own (the parent goes on with the other).
            // SAFETY: closing the child's copies of the sweeper's pipe.
            unsafe {
                libc::close(first.pipe[0]);
                libc::close(first.pipe[1]);
            }
            // --child-life MS: the child stops sweeping (and exits) on
            // its own after MS ms.
            if let Some(ms) = a.get("child-life").and_then(|v| v.parse::<u64>().ok()) {
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    wl::TERM.store(true, Ordering::SeqCst);
                });
            }
            let code = match new_pipe().and_then(|p| {
                first.pipe = p;
                first.run(false, &mut fails)
            }) {
                Ok(()) if fails.is_empty() => 0,
                Ok(()) => {
                    for f in &fails {
                        wl::log(NAME, &format!("child: {f}"));
                    }
                    1
                }
                Err(e) => {
                    wl::log(NAME, &format!("child: {e}"));
                    2
                }
            };
            std::process::exit(code);
        }
        Some(pid)
    } else {
        None
    };
    let others: Vec<_> = modes[1..]
        .iter()
        .map(|&m| {
            let s = Sweeper::new(m);
            std::thread::spawn(move || sweep(s?))
        })
        .collect();
    let discarder = (discard > 0).then(|| std::thread::spawn(move || discard_loop(discard)));
    let forker = (num(a, "forker", "0")? != 0).then(|| std::thread::spawn(fork_loop));
    let ready = a.ready.clone();
    let mine = std::thread::spawn(move || {
        // The ready file once every sweeper has swept once.
        while SWEPT.load(Ordering::SeqCst) < sweepers && !wl::TERM.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        wl::write_atomic(
            &ready,
            format!("ready pid={}\n", std::process::id()).as_bytes(),
        )
        .map_err(|e| format!("ready file: {e}"))
    });
    first.run(false, &mut fails)?;
    mine.join().map_err(|_| "ready thread panicked")??;
    for (what, t) in [("discard", discarder), ("fork", forker)] {
        if let Some(t) = t {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => fails.push(format!("{what} thread: {e}")),
                Err(_) => fails.push(format!("{what} thread panicked")),
            }
        }
    }
    for (i, t) in others.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(f)) => fails.extend(f.into_iter().map(|f| format!("sweeper {}: {f}", i + 1))),
            Ok(Err(e)) => fails.push(format!("sweeper {}: {e}", i + 1)),
            Err(_) => fails.push(format!("sweeper {} panicked", i + 1)),
        }
    }
    if let Some(pid) = child {
        // SAFETY: our own child, by its pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut status = 0;
        // SAFETY: waits for that child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r != pid {
            fails.push(os_err(&format!("waitpid(child {pid})")));
        } else if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            fails.push(format!(
                "child {pid} failed (status {status:#x}; its log lines say why)"
            ));
        }
    }
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse(
        "wl_sweep --ready FILE --verdict FILE [--mib N] [--threads T] [--discard M] [--thp 1] \
         [--pace US] [--mremap P] [--remap P] [--mprotect P] [--protnone P] [--redo P] \
         [--forker 1] [--tree 1] [--child-life MS]",
    );
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
