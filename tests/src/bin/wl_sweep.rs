//! wl_sweep: a workload that rewrites its memory without pause, to check
//! that a leave-running dump stores the memory of one instant although
//! the task keeps writing while cryo copies it.
//!
//! Usage: `wl_sweep --ready FILE --verdict FILE [--mib N] [--threads T] [--discard M]`
//!
//! Each of T threads (default 1) maps N MiB (default 32) of private
//! anonymous memory of its own and sweeps over
//! it page by page for ever: generation g writes g into the first word of
//! every page, in order, after checking that the page still holds g - 1
//! (what the previous sweep wrote). Before each page it records in a
//! cursor (generation, page) where it is. Every 32nd page is written by the
//! kernel, through read(2) from a pipe, the others by a plain store.
//!
//! A copy of the memory taken at one instant always satisfies the check
//! (pages before the cursor hold g, the rest g - 1), so a restored process
//! carries on sweeping without a failure. A copy taken while the task ran,
//! page by page, holds pages of different generations on both sides of
//! the cursor, and the restored process fails within two sweeps.
//!
//! With `--discard M` one more thread fills M MiB of its own and
//! discards them (MADV_DONTNEED) over and over, as allocators do with
//! memory they free.
//!
//! The ready file reads `ready pid=<pid>` once every thread has done its
//! first sweep. On
//! SIGTERM it checks the whole area against the cursor and writes `PASS`
//! or `FAIL: ...` lines to the verdict file (exit 0 on pass).

use cryo_tests::wl;
use std::sync::atomic::Ordering;

const NAME: &str = "wl_sweep";
const PAGE: usize = 4096;

/// Where the sweep is: written before each page.
#[repr(C)]
struct Cursor {
    gen: u64,
    page: u64,
}

/// Threads that have finished their first sweep.
static SWEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let mib: usize = a
        .get("mib")
        .unwrap_or("32")
        .parse()
        .map_err(|_| "bad --mib")?;
    let threads: usize = a
        .get("threads")
        .unwrap_or("1")
        .parse()
        .map_err(|_| "bad --threads")?;
    let others: Vec<_> = (1..threads)
        .map(|_| std::thread::spawn(move || sweep(mib)))
        .collect();
    let discard: usize = a
        .get("discard")
        .unwrap_or("0")
        .parse()
        .map_err(|_| "bad --discard")?;
    let discarder = (discard > 0).then(|| std::thread::spawn(move || discard_loop(discard)));
    let ready = a.ready.clone();
    let mine = std::thread::spawn(move || {
        // The ready file once every thread has swept once.
        while SWEPT.load(Ordering::SeqCst) < threads && !wl::TERM.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        wl::write_atomic(
            &ready,
            format!("ready pid={}\n", std::process::id()).as_bytes(),
        )
        .map_err(|e| format!("ready file: {e}"))
    });
    let mut fails = sweep(mib)?;
    mine.join().map_err(|_| "ready thread panicked")??;
    if let Some(d) = discarder {
        if let Err(e) = d
            .join()
            .map_err(|_| "discard thread panicked".to_string())?
        {
            fails.push(format!("discard thread: {e}"));
        }
    }
    for (i, t) in others.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(f)) => fails.extend(f.into_iter().map(|f| format!("thread {}: {f}", i + 1))),
            Ok(Err(e)) => fails.push(format!("thread {}: {e}", i + 1)),
            Err(_) => fails.push(format!("thread {} panicked", i + 1)),
        }
    }
    Ok(fails)
}

/// Fill `mib` MiB and discard them, again and again, until SIGTERM.
fn discard_loop(mib: usize) -> Result<(), String> {
    let len = mib << 20;
    // SAFETY: a new private anonymous mapping; nothing else uses it.
    let area = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if area == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let mut n = 0u8;
    while !wl::TERM.load(Ordering::SeqCst) {
        n = n.wrapping_add(1);
        // SAFETY: `area` is `len` bytes of our own mapping.
        unsafe { std::ptr::write_bytes(area as *mut u8, n | 1, len) };
        // SAFETY: discarding our own mapping's pages.
        if unsafe { libc::madvise(area, len, libc::MADV_DONTNEED) } != 0 {
            return Err(format!("madvise: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// One sweeper over a mapping of its own, until SIGTERM.
fn sweep(mib: usize) -> Result<Vec<String>, String> {
    let pages = mib * 256;
    // SAFETY: a new private anonymous mapping; nothing else uses it.
    let area = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (pages + 1) * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if area == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let base = area as *mut u8;
    let cursor = base as *mut Cursor;
    // SAFETY: pages 1..=pages of the mapping, whose first words hold the
    // generations; page 0 holds the cursor.
    let word = |i: usize| unsafe { base.add((i + 1) * PAGE) as *mut u64 };
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `pipe`.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    let mut fails = Vec::new();
    let mut gen = 1u64;
    'sweeps: loop {
        for i in 0..pages {
            // SAFETY: `word(i)` is inside the mapping; volatile, since the
            // point is what memory holds.
            let have = unsafe { word(i).read_volatile() };
            if have != gen - 1 {
                fails.push(format!(
                    "generation {gen}: page {i} holds {have}, expected {} (the memory is not one instant's)",
                    gen - 1
                ));
                break 'sweeps;
            }
            // SAFETY: the cursor lies in page 0 of the mapping.
            unsafe {
                std::ptr::addr_of_mut!((*cursor).gen).write_volatile(gen);
                std::ptr::addr_of_mut!((*cursor).page).write_volatile(i as u64);
            }
            if i % 32 == 0 {
                let bytes = gen.to_ne_bytes();
                // SAFETY: 8 bytes from `bytes` into our pipe, then 8 bytes
                // from the pipe into the first word of page i (inside the
                // mapping): the kernel writes that page.
                let ok = unsafe {
                    libc::write(pipe[1], bytes.as_ptr().cast(), 8) == 8
                        && libc::read(pipe[0], word(i).cast(), 8) == 8
                };
                if !ok {
                    return Err(format!(
                        "pipe write/read: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            } else {
                // SAFETY: inside the mapping.
                unsafe { word(i).write_volatile(gen) };
            }
            if wl::TERM.load(Ordering::SeqCst) {
                break 'sweeps;
            }
        }
        if gen == 1 {
            SWEPT.fetch_add(1, Ordering::SeqCst);
        }
        gen += 1;
    }
    if fails.is_empty() {
        // SAFETY: the cursor lies in page 0 of the mapping.
        let (g, at) = unsafe { ((*cursor).gen, (*cursor).page as usize) };
        for i in 0..pages {
            // SAFETY: inside the mapping.
            let have = unsafe { word(i).read_volatile() };
            // The page under the cursor may hold either generation.
            let ok = match i.cmp(&at) {
                std::cmp::Ordering::Less => have == g,
                std::cmp::Ordering::Equal => have == g || have == g - 1,
                std::cmp::Ordering::Greater => have == g - 1,
            };
            if !ok {
                fails.push(format!(
                    "at the end: page {i} holds {have}; the cursor is at page {at} of generation {g}"
                ));
                break;
            }
        }
    }
    wl::log(NAME, &format!("stopped in generation {gen}"));
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse(
        "wl_sweep --ready FILE --verdict FILE [--mib N] [--threads T] [--discard M]",
    );
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
