//! Shared anonymous memory of several layouts across three levels of a
//! tree, and private pages still shared copy-on-write, which a restore
//! must give back as one object and one frame.
//!
//! `wl_shm --ready FILE --verdict FILE [--cow-frames 1]`
//!
//! The root maps, before it forks:
//! - `split`: 16 shared pages whose pages 4 to 7 it unmapped (two
//!   mappings of one object, at offsets 0 and 8 pages);
//! - `moved`: 8 shared pages moved elsewhere with mremap;
//! - `one`: a single shared page;
//! - `big`: 2 MiB and one page shared, every 16th page written (the rest
//!   never touched);
//! - `cow`: 256 private pages it wrote.
//!
//! Its child `mid` maps `late` (4 shared pages) after the fork, writes
//! page 7 of `cow` (its own copy) and forks `leaf`, which inherits all.
//!
//! On SIGTERM each process checks every region's contents, writes its mark
//! into its own slot of each shared region it has, and waits until every
//! other process's mark is there (the regions are one object again); with
//! `--cow-frames 1` each child also checks, through /proc/PID/pagemap,
//! that the pages of `cow` it never wrote are the same frames as its
//! parent's (a restore that copies them doubles the memory they use).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cryo_tests::wl;

const NAME: &str = "wl_shm";
const PAGE: usize = 4096;
const BIG_PAGES: usize = 513;
const COW_PAGES: usize = 256;
/// The `cow` page `mid` writes before it forks `leaf`.
const MID_WRITES: usize = 7;

/// The processes, by slot: 1 root, 2 mid, 3 leaf.
const ROOT: usize = 1;
const MID: usize = 2;
const LEAF: usize = 3;

struct Regions {
    split: usize,
    moved: usize,
    one: usize,
    big: usize,
    cow: usize,
    /// Made by `mid` after the fork (0 in the root).
    late: usize,
}

fn pat(region: u64, page: usize, word: usize) -> u64 {
    (region << 56) ^ ((page as u64) << 20) ^ (word as u64) ^ 0x5a5a_0000_0000
}

fn map(pages: usize, flags: i32) -> Result<usize, String> {
    // SAFETY: a new mapping the kernel places.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(p as usize)
}

fn word(addr: usize, page: usize, w: usize) -> *mut u64 {
    (addr + page * PAGE + w * 8) as *mut u64
}

/// Write the pattern of `region` into page `page` at `addr` (words 1..),
/// word 0 of each page is a slot for the marks.
fn fill_page(addr: usize, region: u64, page: usize) {
    for w in 8..PAGE / 8 {
        // SAFETY: `addr` is a mapping of ours holding page `page`.
        unsafe { word(addr, page, w).write_volatile(pat(region, page, w)) };
    }
}

fn page_ok(addr: usize, region: u64, page: usize) -> bool {
    // SAFETY: as for fill_page; read only.
    (8..PAGE / 8).all(|w| unsafe { word(addr, page, w).read_volatile() } == pat(region, page, w))
}

fn page_zero(addr: usize, page: usize) -> bool {
    // SAFETY: as for fill_page; read only.
    (0..PAGE / 8).all(|w| unsafe { word(addr, page, w).read_volatile() } == 0)
}

/// The pages of each shared region with contents, as (region tag, address,
/// page numbers written).
fn shared_pages(r: &Regions) -> Vec<(u64, usize, Vec<usize>)> {
    let mut v = vec![
        (1, r.split, (0..4).collect()),
        (2, r.split + 8 * PAGE, (0..8).collect()),
        (3, r.moved, (0..8).collect()),
        (4, r.one, vec![0]),
        (5, r.big, (0..BIG_PAGES).step_by(16).collect()),
    ];
    if r.late != 0 {
        v.push((6, r.late, (0..4).collect()));
    }
    v
}

fn setup_root() -> Result<Regions, String> {
    let shared = libc::MAP_SHARED;
    let split = map(16, shared)?;
    // SAFETY: unmaps pages 4..8 of our own mapping, which nothing uses.
    if unsafe { libc::munmap((split + 4 * PAGE) as *mut libc::c_void, 4 * PAGE) } != 0 {
        return Err("munmap".into());
    }
    let first = map(8, shared)?;
    let hole = map(8 + 256, libc::MAP_PRIVATE)?;
    // SAFETY: moves our own mapping onto a range we reserved for it.
    let moved = unsafe {
        libc::mremap(
            first as *mut libc::c_void,
            8 * PAGE,
            8 * PAGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            (hole + 128 * PAGE) as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        return Err(format!("mremap: {}", std::io::Error::last_os_error()));
    }
    let r = Regions {
        split,
        moved: moved as usize,
        one: map(1, shared)?,
        big: map(BIG_PAGES, shared)?,
        cow: map(COW_PAGES, libc::MAP_PRIVATE)?,
        late: 0,
    };
    for (tag, addr, pages) in shared_pages(&r) {
        for p in pages {
            fill_page(addr, tag, p);
        }
    }
    for p in 0..COW_PAGES {
        fill_page(r.cow, 9, p);
    }
    Ok(r)
}

/// The frame number of page `page` at `addr` in process `pid` (0: none).
fn frame(pid: &str, addr: usize, page: usize) -> u64 {
    let Ok(f) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else {
        return 0;
    };
    let mut b = [0u8; 8];
    let off = ((addr / PAGE + page) * 8) as u64;
    if std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).is_err() {
        return 0;
    }
    let e = u64::from_ne_bytes(b);
    if e >> 63 == 0 {
        0
    } else {
        e & ((1 << 55) - 1)
    }
}

fn check(who: &str, me: usize, r: &Regions, cow_frames: bool, fails: &mut Vec<String>) {
    for (tag, addr, pages) in shared_pages(r) {
        for &p in &pages {
            if !page_ok(addr, tag, p) {
                fails.push(format!(
                    "{who}: shared region {tag} page {p} lost its contents"
                ));
                break;
            }
        }
    }
    // `big`'s untouched pages stay zeros.
    if let Some(p) = (0..BIG_PAGES)
        .filter(|p| p % 16 != 0)
        .find(|&p| !page_zero(r.big, p))
    {
        fails.push(format!(
            "{who}: untouched page {p} of the big shared region is not zero"
        ));
    }
    let mine = |p: usize| me != ROOT && p == MID_WRITES;
    for p in 0..COW_PAGES {
        let want = if mine(p) { 10 } else { 9 };
        if !page_ok(r.cow, want, p) {
            fails.push(format!("{who}: private page {p} lost its contents"));
            break;
        }
    }
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    if cow_frames && me != ROOT {
        let differ: Vec<usize> = (0..COW_PAGES)
            .filter(|&p| {
                let (a, b) = (
                    frame("self", r.cow, p),
                    frame(&parent.to_string(), r.cow, p),
                );
                let own = me == MID && p == MID_WRITES;
                a == 0 || b == 0 || (a == b) == own
            })
            .collect();
        if !differ.is_empty() {
            fails.push(format!(
                "{who}: {} of the 256 private pages (first {:?}) are not shared copy-on-write with the parent as they were (page {MID_WRITES} is mid's own)",
                differ.len(),
                &differ[..differ.len().min(8)]
            ));
        }
    }
    // The marks: every participant of each region writes its slot.
    let participants = |tag: u64| {
        if tag == 6 {
            vec![MID, LEAF]
        } else {
            vec![ROOT, MID, LEAF]
        }
    };
    for (_, addr, _) in shared_pages(r) {
        // SAFETY: the slots are word `me` of the region's first page,
        // inside our mapping (the pattern starts at word 8).
        unsafe { word(addr, 0, me).write_volatile(0xabc0 + me as u64) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (tag, addr, _) in shared_pages(r) {
        for &who_else in &participants(tag) {
            // SAFETY: as above.
            while unsafe { word(addr, 0, who_else).read_volatile() } != 0xabc0 + who_else as u64 {
                if Instant::now() > deadline {
                    fails.push(format!(
                        "{who}: process {who_else}'s mark never showed in shared region {tag} (not one object any more?)"
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

fn wait_term() {
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn fork() -> Result<i32, String> {
    // SAFETY: the workload is single-threaded here.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork".into());
    }
    Ok(pid)
}

/// Pass SIGTERM on to `kid` (the marks are checked by all at once).
fn pass_on(kid: i32) {
    // SAFETY: signals our own child.
    unsafe { libc::kill(kid, libc::SIGTERM) };
}

/// Wait for `kid` and take its verdict lines.
fn reap(kid: i32, verdict: &Path, fails: &mut Vec<String>) {
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(kid, std::ptr::null_mut(), 0) };
    let text = std::fs::read_to_string(verdict)
        .unwrap_or_else(|_| format!("FAIL: {} wrote no verdict\n", verdict.display()));
    fails.extend(
        text.lines()
            .filter_map(|l| l.strip_prefix("FAIL: "))
            .map(String::from),
    );
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let cow_frames = a.get("cow-frames") == Some("1");
    let mut r = setup_root()?;
    let mid_verdict = PathBuf::from(format!("{}.mid", a.verdict.display()));
    let leaf_verdict = PathBuf::from(format!("{}.leaf", a.verdict.display()));
    let (ready_r, ready_w) = {
        let mut p = [0; 2];
        // SAFETY: pipe into a local array.
        if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
            return Err("pipe".into());
        }
        (p[0], p[1])
    };
    let mid = fork()?;
    if mid == 0 {
        r.late = map(4, libc::MAP_SHARED)?;
        for p in 0..4 {
            fill_page(r.late, 6, p);
        }
        fill_page(r.cow, 10, MID_WRITES);
        let leaf = fork()?;
        if leaf == 0 {
            wl::write_fd(ready_w, b"l");
            wait_term();
            let mut fails = Vec::new();
            check("leaf", LEAF, &r, cow_frames, &mut fails);
            wl::finish("wl_shm leaf", &leaf_verdict, Ok(fails));
        }
        wl::write_fd(ready_w, b"m");
        wait_term();
        pass_on(leaf);
        let mut fails = Vec::new();
        check("mid", MID, &r, cow_frames, &mut fails);
        reap(leaf, &leaf_verdict, &mut fails);
        wl::finish("wl_shm mid", &mid_verdict, Ok(fails));
    }
    let mut got = [0u8; 2];
    let mut n = 0;
    while n < 2 {
        // SAFETY: reading into a local buffer.
        let k = unsafe { libc::read(ready_r, got[n..].as_mut_ptr().cast(), 2 - n) };
        if k <= 0 {
            return Err("the children did not get ready".into());
        }
        n += k as usize;
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    wait_term();
    pass_on(mid);
    let mut fails = Vec::new();
    check("root", ROOT, &r, cow_frames, &mut fails);
    reap(mid, &mid_verdict, &mut fails);
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse("wl_shm --ready FILE --verdict FILE [--cow-frames 1]");
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
