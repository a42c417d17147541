//! wl_single: a single-threaded ZDTM-style workload.
//!
//! Usage: `wl_single --ready PATH --verdict PATH [--wait nanosleep|pause|busy|futex] [--tmp DIR]
//! [--drop-creds] [--thread]`
//!
//! It sets up a wide range of process state, records a "before" snapshot,
//! writes the ready file, then waits until SIGTERM arrives. After that it
//! checks every piece of state against the snapshot and writes `PASS` or
//! `FAIL: <what>` lines to the verdict file (exit 0 on pass, 1 on fail).
//!
//! Stdin must be /dev/null and stdout/stderr a regular file opened with
//! O_APPEND; every other descriptor is closed at startup.
//!
//! `--drop-creds` (start it as root): after the setup that needs root, become
//! uid/gid 1000 with supplementary groups 1234 and 5678, no capabilities and
//! no_new_privs, so that the credentials checked after restore are those of
//! an unprivileged process. `--thread` starts one extra thread that only
//! sleeps (with every signal blocked), to make the process multi-threaded.

use std::arch::asm;
use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr, CString};
use std::fmt::Debug;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

const PAGE: usize = 4096;
const RSEQ_SIG: u32 = 0x5305_3053;
const RSEQ_LEN: u32 = 32;
const ARCH_GET_FS: c_int = 0x1003;
const CPU_ID_SENTINEL: u32 = 0xFFFF_FFF0;
const SIGQUEUE_VALUE: usize = 0x1234;
const TIMER_SIGEV_VALUE: usize = 0xabcd0;
const ALTSTACK_SIZE: usize = 64 * 1024;
const MAPS_BUF: usize = 512 * 1024;
const LARGE_MALLOC: usize = 8 << 20;

const PRIV_ANON_PAGES: usize = 64;
const SHARED_ANON_PAGES: usize = 16;
const UNTOUCHED_PAGES: usize = 256;
const RO_PAGES: usize = 8;
const NONE_PAGES: usize = 4;
const PRIV_FILE_PAGES: usize = 16;
const SHARED_FILE_PAGES: usize = 8;
const PRIV_FILE_DIRTY: [usize; 2] = [2, 5];
const NONE_FILLED_PAGES: usize = 8;
const RX_PAGES: usize = 8;
/// The uid and gid `--drop-creds` switches to.
const DROP_ID: u32 = 1000;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

// Region ids mixed into the memory patterns, so that two regions never hold
// the same bytes and a region restored at the wrong address is noticed.
const R_PRIV_ANON: u64 = 1;
const R_SHARED_ANON: u64 = 2;
const R_RO: u64 = 3;
const R_LARGE: u64 = 4;
const R_FILE_PRIV_CONTENT: u64 = 5;
const R_FILE_PRIV_DIRTY: u64 = 6;
const R_FILE_SHARED_INIT: u64 = 7;
const R_FILE_SHARED_WRITTEN: u64 = 8;
const R_FILE_SHARED_AFTER: u64 = 9;
const R_BSS: u64 = 10;
const R_STACK: u64 = 11;
const R_HEAP: u64 = 12;
const R_NONE_FILLED: u64 = 13;
const R_RX: u64 = 14;
const R_ADVISED: u64 = 15;
const R_GUARDED: u64 = 16;
const R_DROPPABLE: u64 = 17;

/// The `guarded` region's pages, and which of them are guard pages
/// (MADV_GUARD_INSTALL: every access faults).
const GUARDED_PAGES: usize = 5;
const GUARD_AT: [usize; 2] = [1, 3];
/// madvise(2) advice and mmap(2) flag newer than the libc crate.
const MADV_GUARD_INSTALL: c_int = 102;
const MAP_DROPPABLE: c_int = 0x08;
const SYS_MSEAL: libc::c_long = 462;

/// For each page of `r`: whether it is a guard page (pagemap bit 58).
fn guard_pages(r: &Region) -> Vec<bool> {
    let Ok(f) = std::fs::File::open("/proc/self/pagemap") else {
        return Vec::new();
    };
    let mut buf = vec![0u8; r.len / PAGE * 8];
    let off = (r.addr() / PAGE * 8) as u64;
    if std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, off).is_err() {
        return Vec::new();
    }
    buf.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()) >> 58 & 1 == 1)
        .collect()
}

/// The VmFlags of the mapping holding `addr` (/proc/self/smaps).
fn vm_flags_at(addr: usize) -> Vec<String> {
    let smaps = read_text("/proc/self/smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if inside {
                return flags.split_whitespace().map(String::from).collect();
            }
        } else if let Some((a, b)) = line.split_once(' ').and_then(|(r, _)| r.split_once('-')) {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
            }
        }
    }
    Vec::new()
}

/// The advice given to each page of the `advised` region, and the smaps
/// VmFlags letters each shows.
const ADVICE: [(c_int, &str); 6] = [
    (libc::MADV_DONTFORK, "dc"),
    (libc::MADV_WIPEONFORK, "wf"),
    (libc::MADV_DONTDUMP, "dd"),
    (libc::MADV_HUGEPAGE, "hg"),
    (libc::MADV_NOHUGEPAGE, "nh"),
    (libc::MADV_MERGEABLE, "mg"),
];

/// For each page of `r`: the advice letters (of ADVICE) in the VmFlags of
/// the mapping that holds it, from /proc/self/smaps.
fn advice_of(r: &Region) -> Vec<String> {
    let smaps = read_text("/proc/self/smaps");
    let mut vmas: Vec<(usize, usize, Vec<&str>)> = Vec::new();
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(v) = vmas.last_mut() {
                v.2 = flags
                    .split_whitespace()
                    .filter(|f| ADVICE.iter().any(|(_, l)| l == f))
                    .collect();
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    vmas.push((a, b, Vec::new()));
                }
            }
        }
    }
    (0..r.len / PAGE)
        .map(|i| {
            let at = r.ptr as usize + i * PAGE;
            match vmas.iter().find(|v| v.0 <= at && at < v.1) {
                Some(v) => format!("page {i}: {}", v.2.join(" ")),
                None => format!("page {i}: not mapped"),
            }
        })
        .collect()
}

static TERM: AtomicBool = AtomicBool::new(false);
/// The word the `futex` wait mode sleeps on; SIGTERM sets it.
static FUTEX_WORD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static USR1_COUNT: AtomicU64 = AtomicU64::new(0);
static USR1_LAST_SIGNO: AtomicI32 = AtomicI32::new(0);
static USR1_LAST_CODE: AtomicI32 = AtomicI32::new(0);
static USR1_LAST_SP: AtomicUsize = AtomicUsize::new(0);
static RT5_COUNT: AtomicU64 = AtomicU64::new(0);
static VTALRM_COUNT: AtomicU64 = AtomicU64::new(0);

const DATA_WORDS: usize = 512;
const fn data_init() -> [u64; DATA_WORDS] {
    let mut a = [0u64; DATA_WORDS];
    let mut i = 0;
    while i < DATA_WORDS {
        a[i] = 0x1111_2222_0000_0000 | (i as u64 * 3 + 1);
        i += 1;
    }
    a
}
/// .data: a static with a non-zero initializer, modified at setup.
static mut DATA_ARR: [u64; DATA_WORDS] = data_init();
/// .bss: a zero-initialised static, written at setup.
const BSS_WORDS: usize = 16 * 1024;
static mut BSS_ARR: [u64; BSS_WORDS] = [0; BSS_WORDS];

thread_local! {
    static TLS_VAL: Cell<u64> = const { Cell::new(0) };
}

extern "C" {
    static __rseq_offset: isize;
    static __rseq_size: u32;
    fn sigqueue(pid: libc::pid_t, sig: c_int, value: libc::sigval) -> c_int;
}

fn pat(region: u64, page: usize, word: usize) -> u64 {
    region.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ ((page as u64) << 32)
        ^ (word as u64)
        ^ 0x5A5A_0000_0000_0000
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errstr() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Collects failure lines.
struct Checker {
    fails: Vec<String>,
}

impl Checker {
    fn fail(&mut self, msg: impl Into<String>) {
        self.fails.push(msg.into());
    }
    fn eq<T: PartialEq + Debug>(&mut self, what: &str, before: T, after: T) {
        if before != after {
            self.fail(format!("{what}: before {before:?}, after {after:?}"));
        }
    }
    fn ok(&mut self, what: &str, cond: bool, detail: impl FnOnce() -> String) {
        if !cond {
            let d = detail();
            self.fail(format!("{what}: {d}"));
        }
    }
}

/// A mapping made by this program. Never unmapped.
#[derive(Clone, Copy)]
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    fn map(len: usize, prot: c_int, flags: c_int, fd: c_int) -> Result<Region, String> {
        // SAFETY: mmap with a null hint and without MAP_FIXED never replaces an
        // existing mapping; the result is checked for MAP_FAILED.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {len} bytes: {}", errstr()));
        }
        Ok(Region { ptr: p.cast(), len })
    }
    fn addr(&self) -> usize {
        self.ptr as usize
    }
    fn protect(&self, prot: c_int) -> Result<(), String> {
        // SAFETY: ptr/len describe a whole mapping made by Region::map (or a
        // malloc'ed block this program owns) that is never unmapped; changing
        // its protection affects no memory Rust code holds references into
        // (callers only read it through words() while it is readable).
        if unsafe { libc::mprotect(self.ptr.cast(), self.len, prot) } != 0 {
            return Err(format!(
                "mprotect({:#x}, {:#x}, {prot:#x}): {}",
                self.addr(),
                self.len,
                errstr()
            ));
        }
        Ok(())
    }
    /// The range of this region as /proc/PID/maps prints it.
    fn maps_range(&self) -> String {
        format!("{:08x}-{:08x}", self.addr(), self.addr() + self.len)
    }
    fn words(&self) -> &[u64] {
        // SAFETY: ptr is a page-aligned readable mapping of len bytes that is
        // never unmapped; callers only call this on readable regions, and no
        // mutable slice of it is alive at the same time (single thread, the
        // slices are temporaries).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u64, self.len / 8) }
    }
    #[allow(clippy::mut_from_ref)]
    fn words_mut(&self) -> &mut [u64] {
        // SAFETY: as for words(), and callers only call this on writable
        // regions while no other slice of the region is alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u64, self.len / 8) }
    }
    fn fill(&self, region: u64) {
        for (i, w) in self.words_mut().iter_mut().enumerate() {
            *w = pat(region, i * 8 / PAGE, i % (PAGE / 8));
        }
    }
}

/// The guard pages are guard pages still, the pages between them hold
/// their pattern; the sealed page is sealed; the droppable mapping is
/// droppable, each page either its pattern or dropped (zeros).
fn check_guards(ck: &mut Checker, s: &Setup) {
    let want: Vec<bool> = (0..GUARDED_PAGES).map(|p| GUARD_AT.contains(&p)).collect();
    ck.eq(
        "guard pages (pagemap bit 58)",
        &want,
        &guard_pages(&s.guarded),
    );
    let words = s.guarded.words();
    for p in (0..GUARDED_PAGES).filter(|p| !GUARD_AT.contains(p)) {
        let page = &words[p * PAGE / 8..(p + 1) * PAGE / 8];
        check_words(ck, "anon mapping with guard pages", page, R_GUARDED, p);
    }
    if let Some(m) = &s.sealed {
        if !vm_flags_at(m.addr()).iter().any(|f| f == "sl") {
            ck.fail("the sealed page is not sealed (no sl in its VmFlags)");
        }
        // SAFETY: mprotect of our sealed page, which the seal must refuse
        // (it changes nothing if it is honoured).
        if unsafe { libc::mprotect(m.ptr.cast(), PAGE, libc::PROT_READ | libc::PROT_WRITE) } == 0 {
            ck.fail("mprotect of the sealed page succeeded");
        }
    }
    let Some(d) = &s.droppable else {
        return;
    };
    if !vm_flags_at(d.addr()).iter().any(|f| f == "dp") {
        ck.fail("the MAP_DROPPABLE mapping is not droppable (no dp in its VmFlags)");
    }
    for (p, page) in d.words().chunks(PAGE / 8).enumerate() {
        if page.iter().any(|&w| w != 0) {
            check_words(ck, "droppable mapping", page, R_DROPPABLE, p);
        }
    }
}

/// Checks that `words` (starting at page `first_page` of the pattern) hold
/// pattern `region`; reports the first mismatch.
fn check_words(ck: &mut Checker, what: &str, words: &[u64], region: u64, first_page: usize) {
    for (i, w) in words.iter().enumerate() {
        let page = first_page + i * 8 / PAGE;
        let word = i % (PAGE / 8);
        let want = pat(region, page, word);
        // SAFETY: w is a valid reference; a volatile read makes sure the
        // value is read from memory now.
        let got = unsafe { std::ptr::read_volatile(w) };
        if got != want {
            let bad = words
                .iter()
                .enumerate()
                .filter(|(j, v)| **v != pat(region, first_page + j * 8 / PAGE, j % (PAGE / 8)))
                .count();
            ck.fail(format!(
                "{what}: page {page} word {word}: expected {want:#018x}, found {got:#018x} ({bad} words differ)"
            ));
            return;
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes())
        .unwrap_or_else(|_| CString::new("/nonexistent").unwrap_or_default())
}

/// Reads a whole file into `buf` with raw syscalls (no allocation).
fn read_into(path: &CStr, buf: &mut [u8]) -> Result<usize, String> {
    // SAFETY: path is a valid NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path:?}: {}", errstr()));
    }
    let mut n = 0;
    let res = loop {
        if n == buf.len() {
            break Err(format!("{path:?} larger than {} bytes", buf.len()));
        }
        // SAFETY: the destination is the unfilled tail of buf, of exactly the length given.
        let r = unsafe { libc::read(fd, buf[n..].as_mut_ptr().cast(), buf.len() - n) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            break Err(format!("read {path:?}: {}", errstr()));
        }
        if r == 0 {
            break Ok(n);
        }
        n += r as usize;
    };
    // SAFETY: fd was opened above and is closed once.
    unsafe { libc::close(fd) };
    res
}

fn read_bytes(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| format!("<cannot read {path}: {e}>").into_bytes())
}

fn read_text(path: &str) -> String {
    String::from_utf8_lossy(&read_bytes(path)).into_owned()
}

fn readlink(path: &str) -> String {
    match std::fs::read_link(path) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) => format!("<readlink {path}: {e}>"),
    }
}

/// Fields 26,27,28,45..51 of /proc/self/stat.
fn stat_mm_fields() -> Vec<(usize, String)> {
    let s = read_text("/proc/self/stat");
    let rest = match s.rfind(')') {
        Some(i) => &s[i + 1..],
        None => return vec![(0, format!("<bad stat {s}>"))],
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut out = Vec::new();
    for n in [26usize, 27, 28, 45, 46, 47, 48, 49, 50, 51] {
        out.push((n, f.get(n - 3).map(|v| v.to_string()).unwrap_or_default()));
    }
    out
}

fn status_lines(prefixes: &[&str]) -> Vec<String> {
    read_text("/proc/self/status")
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .map(str::to_string)
        .collect()
}

fn status_field(name: &str) -> String {
    let key = format!("{name}:");
    read_text("/proc/self/status")
        .lines()
        .find(|l| l.starts_with(&key))
        .map(|l| l[key.len()..].trim().to_string())
        .unwrap_or_else(|| format!("<no {name}>"))
}

/// (start-end, perms, offset, pathname) of each maps line.
fn maps_entries(buf: &[u8]) -> Vec<(String, String, String, String)> {
    String::from_utf8_lossy(buf)
        .lines()
        .map(|l| {
            let mut it = l.splitn(6, ' ');
            let range = it.next().unwrap_or("").to_string();
            let perms = it.next().unwrap_or("").to_string();
            let off = it.next().unwrap_or("").to_string();
            let _dev = it.next();
            let _ino = it.next();
            let path = it.next().unwrap_or("").trim().to_string();
            (range, perms, off, path)
        })
        .collect()
}

fn maps_line_at(
    entries: &[(String, String, String, String)],
    addr: usize,
) -> Option<&(String, String, String, String)> {
    entries.iter().find(|e| {
        let mut r = e.0.split('-');
        let s = usize::from_str_radix(r.next().unwrap_or(""), 16).unwrap_or(usize::MAX);
        let t = usize::from_str_radix(r.next().unwrap_or(""), 16).unwrap_or(0);
        s <= addr && addr < t
    })
}

/// Checks that region `r` is exactly one maps line (same start and end, no
/// merge with a neighbour) with permissions `perms`.
fn check_vma(
    ck: &mut Checker,
    what: &str,
    entries: &[(String, String, String, String)],
    r: &Region,
    perms: &str,
) {
    match maps_line_at(entries, r.addr()) {
        Some(l) if l.0 == r.maps_range() && l.1 == perms => {}
        other => ck.fail(format!(
            "{what}: maps line {other:?}, expected {} {perms}",
            r.maps_range()
        )),
    }
}

fn dumpable() -> c_int {
    // SAFETY: PR_GET_DUMPABLE takes no pointer argument and only queries.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn chown_path(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let c = cstr(path);
    // SAFETY: c is a NUL-terminated path; chown reads nothing else.
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        return Err(format!("chown {}: {}", path.display(), errstr()));
    }
    Ok(())
}

/// The audit login uid the process gives itself.
const LOGINUID: u32 = 4242;

/// SECBIT_NOROOT and SECBIT_NOROOT_LOCKED, set by `--drop-creds`.
const DROP_SECUREBITS: c_int = 0b11;

/// `--drop-creds`: sets securebits DROP_SECUREBITS, becomes uid/gid
/// DROP_ID with groups 1234 and 5678 and no capabilities, sets
/// no_new_privs and makes the process dumpable again (a credential change
/// clears it, which would make files like /proc/self/auxv unreadable by
/// the process itself).
///
/// `after_drop` lists paths the process still opens, creates files in or
/// renames in after the drop: they are given to DROP_ID first.
fn drop_creds(after_drop: &[PathBuf]) -> Result<(), String> {
    for p in after_drop {
        chown_path(p, DROP_ID, DROP_ID)?;
    }
    // SAFETY: the following calls only change this process's credentials and
    // prctl attributes; every pointer argument points to live local data of
    // the size given. Order: the gid and the groups while we still have
    // CAP_SETGID, then the uid (which clears the effective and permitted sets
    // as every uid becomes non-zero).
    unsafe {
        // Securebits while we still have CAP_SETPCAP: a restore must put
        // them back (and may not drop the lock).
        if libc::prctl(
            libc::PR_SET_SECUREBITS,
            DROP_SECUREBITS as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(format!("PR_SET_SECUREBITS: {}", errstr()));
        }
        if libc::setresgid(DROP_ID, DROP_ID, DROP_ID) != 0 {
            return Err(format!("setresgid({DROP_ID}): {}", errstr()));
        }
        let gs: [libc::gid_t; 2] = [1234, 5678];
        if libc::setgroups(2, gs.as_ptr()) != 0 {
            return Err(format!("setgroups after setresgid: {}", errstr()));
        }
        if libc::setresuid(DROP_ID, DROP_ID, DROP_ID) != 0 {
            return Err(format!("setresuid({DROP_ID}): {}", errstr()));
        }
        // Clear the inheritable set too (and anything left in the others).
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
            return Err(format!("capset(0): {}", errstr()));
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            return Err(format!("PR_CAP_AMBIENT_CLEAR_ALL: {}", errstr()));
        }
        if libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            return Err(format!("PR_SET_NO_NEW_PRIVS: {}", errstr()));
        }
        if libc::prctl(
            libc::PR_SET_DUMPABLE,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            return Err(format!("PR_SET_DUMPABLE: {}", errstr()));
        }
    }
    Ok(())
}

/// `--thread`: starts a thread that sleeps forever with every signal
/// blocked, so that signals sent to the process reach the main thread.
fn start_sleeper_thread() -> Result<(), String> {
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: all is a valid sigset_t owned here.
    unsafe { libc::sigfillset(&mut all) };
    let mut old = sigset_of(&[]);
    // Block everything while the thread is created: it inherits the mask,
    // so no signal can be delivered to it before it sleeps.
    // SAFETY: all and old are valid sigsets; only this thread's mask changes.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let r = std::thread::Builder::new()
        .name("wl-sleeper".into())
        .spawn(move || {
            // Allocate once so glibc sets up this thread's malloc arena
            // now, before the main thread takes its maps snapshot.
            drop(std::hint::black_box(vec![0u8; 4096]));
            let _ = tx.send(());
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        });
    // SAFETY: old is the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    r.map(drop).map_err(|e| format!("spawn thread: {e}"))?;
    rx.recv()
        .map_err(|e| format!("sleeper thread did not start: {e}"))
}

fn sigset_list(set: &libc::sigset_t) -> Vec<c_int> {
    (1..=64)
        // SAFETY: set is an initialised sigset_t and sig is in 1..=64.
        .filter(|&s| unsafe { libc::sigismember(set, s) } == 1)
        .collect()
}

fn sigset_of(sigs: &[c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t owned here.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: set is a valid sigset_t owned here.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

fn blocked_mask() -> Vec<c_int> {
    let mut old = sigset_of(&[]);
    // SAFETY: a null new set only queries the mask into `old`.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut old) };
    sigset_list(&old)
}

fn pending() -> Vec<c_int> {
    let mut set = sigset_of(&[]);
    // SAFETY: set is a valid out pointer.
    unsafe { libc::sigpending(&mut set) };
    sigset_list(&set)
}

#[derive(PartialEq, Debug, Clone)]
struct ActionInfo {
    handler: usize,
    flags: c_int,
    mask: Vec<c_int>,
    restorer: usize,
}

fn get_action(sig: c_int) -> ActionInfo {
    // SAFETY: sigaction is plain data.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries into `old`.
    unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    ActionInfo {
        handler: old.sa_sigaction,
        flags: old.sa_flags,
        mask: sigset_list(&old.sa_mask),
        restorer: old.sa_restorer.map(|f| f as usize).unwrap_or(0),
    }
}

fn set_action(sig: c_int, handler: usize, flags: c_int, mask: &[c_int]) -> Result<(), String> {
    // SAFETY: sigaction is plain data.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = flags;
    act.sa_mask = sigset_of(mask);
    // SAFETY: act is fully initialised; handler is an async-signal-safe
    // extern "C" function of the matching signature for the flags.
    if unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) } != 0 {
        return Err(format!("sigaction({sig}): {}", errstr()));
    }
    Ok(())
}

extern "C" fn on_term(_sig: c_int) {
    TERM.store(true, Ordering::SeqCst);
    FUTEX_WORD.store(1, Ordering::SeqCst);
}

extern "C" fn on_usr1(sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let marker = 0u8;
    USR1_LAST_SP.store(&marker as *const u8 as usize, Ordering::SeqCst);
    USR1_LAST_SIGNO.store(sig, Ordering::SeqCst);
    if !info.is_null() {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
        USR1_LAST_CODE.store(unsafe { (*info).si_code }, Ordering::SeqCst);
    }
    USR1_COUNT.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_rt5(_sig: c_int) {
    RT5_COUNT.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_vtalrm(_sig: c_int) {
    VTALRM_COUNT.fetch_add(1, Ordering::SeqCst);
}

fn fs_base() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64 to the given valid address.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut v as *mut u64) };
    if r != 0 {
        return 0;
    }
    v
}

fn rseq_area() -> Option<usize> {
    // SAFETY: glibc (>= 2.35) exports these read-only variables; they are
    // initialised before main runs.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return None;
    }
    Some((fs_base() as isize + off) as usize)
}

/// rseq(ptr, 32, 0, RSEQ_SIG): returns the errno (0 on success).
fn rseq_reregister(ptr: usize) -> i32 {
    // SAFETY: registering rseq at the area glibc already registered; the
    // kernel either refuses (EBUSY for the same arguments) or accepts an area
    // that stays valid for the life of the thread.
    let r = unsafe { libc::syscall(libc::SYS_rseq, ptr, RSEQ_LEN, 0, RSEQ_SIG) };
    if r == 0 {
        0
    } else {
        errno()
    }
}

fn rseq_cpu_fields(ptr: usize) -> (u32, u32) {
    // SAFETY: ptr is this thread's registered struct rseq (TLS, 32-byte
    // aligned); cpu_id_start and cpu_id are its first two u32 fields.
    unsafe {
        (
            std::ptr::read_volatile(ptr as *const u32),
            std::ptr::read_volatile((ptr + 4) as *const u32),
        )
    }
}

/// Writes the sentinel into cpu_id_start, raises SIGUSR1 and returns the
/// value the kernel left there.
fn rseq_sentinel_probe(ptr: usize) -> u32 {
    // SAFETY: see rseq_cpu_fields; user space may write cpu_id_start.
    unsafe { std::ptr::write_volatile(ptr as *mut u32, CPU_ID_SENTINEL) };
    // SAFETY: raise is async-signal-safe; SIGUSR1 has a handler.
    unsafe { libc::raise(libc::SIGUSR1) };
    rseq_cpu_fields(ptr).0
}

fn rlimits() -> Vec<(u64, u64)> {
    (0..16u32)
        .map(|r| {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: l is a valid out pointer.
            if unsafe { libc::getrlimit(r as libc::__rlimit_resource_t, &mut l) } != 0 {
                return (u64::MAX - 1, u64::MAX - 1);
            }
            (l.rlim_cur, l.rlim_max)
        })
        .collect()
}

fn groups() -> Vec<libc::gid_t> {
    let mut g = vec![0 as libc::gid_t; 256];
    // SAFETY: g has room for 256 entries.
    let n = unsafe { libc::getgroups(256, g.as_mut_ptr()) };
    g.truncate(n.max(0) as usize);
    g
}

fn resuid() -> (u32, u32, u32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: three valid out pointers.
    unsafe { libc::getresuid(&mut a, &mut b, &mut c) };
    (a, b, c)
}

fn resgid() -> (u32, u32, u32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: three valid out pointers.
    unsafe { libc::getresgid(&mut a, &mut b, &mut c) };
    (a, b, c)
}

fn comm() -> String {
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let n: Vec<u8> = name.iter().take_while(|&&b| b != 0).copied().collect();
    String::from_utf8_lossy(&n).into_owned()
}

fn cur_umask() -> u32 {
    // SAFETY: umask cannot fail; the old value is put back immediately.
    let m = unsafe { libc::umask(0o077) };
    // SAFETY: as above.
    unsafe { libc::umask(m) };
    m
}

fn personality_now() -> c_int {
    // SAFETY: 0xffffffff only queries the persona.
    unsafe { libc::personality(0xffff_ffff) }
}

fn altstack() -> (usize, usize, c_int) {
    // SAFETY: stack_t is plain data.
    let mut ss: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: a null new stack only queries into ss.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut ss) };
    (ss.ss_sp as usize, ss.ss_size, ss.ss_flags)
}

fn itimer_virtual() -> TimerVal {
    // SAFETY: itimerval is plain data.
    let mut v: libc::itimerval = unsafe { std::mem::zeroed() };
    // SAFETY: v is a valid out pointer.
    unsafe { libc::getitimer(libc::ITIMER_VIRTUAL, &mut v) };
    (
        (v.it_interval.tv_sec, v.it_interval.tv_usec),
        (v.it_value.tv_sec, v.it_value.tv_usec),
    )
}

/// (interval, value) as (seconds, sub-second) pairs.
type TimerVal = ((i64, i64), (i64, i64));

fn posix_timer(t: libc::timer_t) -> Result<TimerVal, String> {
    // SAFETY: itimerspec is plain data.
    let mut v: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: t was returned by timer_create; v is a valid out pointer.
    if unsafe { libc::timer_gettime(t, &mut v) } != 0 {
        return Err(errstr());
    }
    Ok((
        (v.it_interval.tv_sec, v.it_interval.tv_nsec),
        (v.it_value.tv_sec, v.it_value.tv_nsec),
    ))
}

/// A (seconds, microseconds) pair plus `us` microseconds.
fn add_usec((sec, usec): (i64, i64), us: i64) -> (i64, i64) {
    let t = sec * 1_000_000 + usec + us;
    (t / 1_000_000, t % 1_000_000)
}

fn securebits() -> c_int {
    // SAFETY: prctl with integer arguments only reads a process attribute.
    unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) }
}

fn monotonic() -> (i64, i64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec, ts.tv_nsec)
}

fn monotonic_raw_syscall() -> (i64, i64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer; the raw syscall bypasses the vDSO.
    unsafe {
        libc::syscall(
            libc::SYS_clock_gettime,
            libc::CLOCK_MONOTONIC,
            &mut ts as *mut libc::timespec,
        )
    };
    (ts.tv_sec, ts.tv_nsec)
}

fn getfl(fd: c_int) -> c_int {
    // SAFETY: F_GETFL takes no pointer argument.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

fn fd_offset(fd: c_int) -> i64 {
    // SAFETY: lseek with SEEK_CUR and offset 0 only queries.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn fd_size(fd: c_int) -> i64 {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return -1;
    }
    st.st_size
}

fn write_fd(fd: c_int, data: &[u8]) -> isize {
    // SAFETY: data is a valid buffer of data.len() bytes.
    unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) }
}

fn fd_list() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let t = readlink(&format!("/proc/self/fd/{n}"));
                (n, t)
            })
            .collect(),
        Err(e) => vec![("<error>".into(), e.to_string())],
    };
    // The directory's own descriptor is listed too.
    let own = format!("/proc/{}/fd", std::process::id());
    v.retain(|(_, t)| *t != own && !t.starts_with("<readlink"));
    v.sort();
    v
}

fn pread_file(path: &Path, len: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0)
        .map_err(|e| format!("pread {}: {e}", path.display()))?;
    Ok(buf)
}

fn words_of(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

fn bytes_of_pattern(region: u64, pages: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(pages * PAGE);
    for i in 0..pages * PAGE / 8 {
        v.extend_from_slice(&pat(region, i * 8 / PAGE, i % (PAGE / 8)).to_le_bytes());
    }
    v
}

fn heap_byte(buf: usize, i: usize) -> u8 {
    (pat(R_HEAP, buf, i % 512) >> ((i % 8) * 8)) as u8 ^ (i / 512) as u8
}

/// One round of the vector register test: loads ymm0..ymm3 and xmm8..xmm15
/// from `inp`, sleeps in a raw nanosleep syscall, stores them into `out`.
/// Returns the syscall's raw return value.
///
/// # Safety
/// The CPU must support AVX.
#[target_feature(enable = "avx")]
unsafe fn vec_sleep_round(inp: &[u8; 256], out: &mut [u8; 256], ts: &libc::timespec) -> i64 {
    let ret: i64;
    // SAFETY: reads 256 bytes from inp and writes 256 bytes to out (both
    // valid for that size); the nanosleep syscall reads ts and writes nothing
    // (rem = NULL); every register the code touches is declared: rax (result),
    // rcx/r11 (clobbered by syscall), ymm0-3 and ymm8-15.
    unsafe {
        asm!(
            "vmovdqu ymm0, [{i}]",
            "vmovdqu ymm1, [{i} + 32]",
            "vmovdqu ymm2, [{i} + 64]",
            "vmovdqu ymm3, [{i} + 96]",
            "vmovdqu xmm8, [{i} + 128]",
            "vmovdqu xmm9, [{i} + 144]",
            "vmovdqu xmm10, [{i} + 160]",
            "vmovdqu xmm11, [{i} + 176]",
            "vmovdqu xmm12, [{i} + 192]",
            "vmovdqu xmm13, [{i} + 208]",
            "vmovdqu xmm14, [{i} + 224]",
            "vmovdqu xmm15, [{i} + 240]",
            "syscall",
            "vmovdqu [{o}], ymm0",
            "vmovdqu [{o} + 32], ymm1",
            "vmovdqu [{o} + 64], ymm2",
            "vmovdqu [{o} + 96], ymm3",
            "vmovdqu [{o} + 128], xmm8",
            "vmovdqu [{o} + 144], xmm9",
            "vmovdqu [{o} + 160], xmm10",
            "vmovdqu [{o} + 176], xmm11",
            "vmovdqu [{o} + 192], xmm12",
            "vmovdqu [{o} + 208], xmm13",
            "vmovdqu [{o} + 224], xmm14",
            "vmovdqu [{o} + 240], xmm15",
            i = in(reg) inp.as_ptr(),
            o = in(reg) out.as_mut_ptr(),
            inlateout("rax") libc::SYS_nanosleep => ret,
            in("rdi") ts as *const libc::timespec,
            in("rsi") 0usize,
            out("rcx") _,
            out("r11") _,
            out("ymm0") _,
            out("ymm1") _,
            out("ymm2") _,
            out("ymm3") _,
            out("ymm8") _,
            out("ymm9") _,
            out("ymm10") _,
            out("ymm11") _,
            out("ymm12") _,
            out("ymm13") _,
            out("ymm14") _,
            out("ymm15") _,
            options(nostack),
        );
    }
    ret
}

/// Returns (rounds, first mismatch description).
fn wait_nanosleep() -> (u64, Option<String>) {
    if !std::arch::is_x86_feature_detected!("avx") {
        return (0, Some("vector registers: CPU has no AVX".into()));
    }
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 20_000_000,
    };
    let mut inp = [0u8; 256];
    let mut out = [0u8; 256];
    let mut round: u64 = 0;
    let mut first_bad: Option<String> = None;
    while !TERM.load(Ordering::SeqCst) {
        for (j, b) in inp.iter_mut().enumerate() {
            *b = (j as u8).wrapping_mul(37)
                ^ (round as u8).wrapping_mul(101)
                ^ 0xA5
                ^ ((j / 32) as u8);
        }
        out.fill(0);
        // SAFETY: AVX support was checked above.
        let r = unsafe { vec_sleep_round(&inp, &mut out, &ts) };
        if inp != out && first_bad.is_none() {
            let j = (0..256).find(|&j| inp[j] != out[j]).unwrap_or(0);
            let reg = if j < 128 {
                format!("ymm{}", j / 32)
            } else {
                format!("xmm{}", 8 + (j - 128) / 16)
            };
            first_bad = Some(format!(
                "vector registers: round {round} (nanosleep returned {r}): {reg} byte {j}: expected {:#04x}, found {:#04x}",
                inp[j], out[j]
            ));
        }
        round += 1;
    }
    (round, first_bad)
}

fn wait_pause() -> (u64, Option<String>) {
    let mut n = 0;
    let mut bad = None;
    while !TERM.load(Ordering::SeqCst) {
        // SAFETY: pause takes no arguments and only returns on a signal.
        let r = unsafe { libc::syscall(libc::SYS_pause) };
        bad = bad.or_else(|| syscall_leak("pause", r));
        n += 1;
    }
    (n, bad)
}

/// Sleeps in FUTEX_WAIT without a timeout: a dump finds the task inside
/// the syscall with -ERESTARTSYS, the same restart path as a blocking read.
fn wait_futex() -> (u64, Option<String>) {
    let mut n = 0;
    let mut bad = None;
    while !TERM.load(Ordering::SeqCst) {
        // SAFETY: FUTEX_WAIT_PRIVATE on a static word that lives for the
        // whole program; a NULL timeout waits until woken or interrupted.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                FUTEX_WORD.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0u32,
                std::ptr::null::<libc::timespec>(),
            )
        };
        bad = bad.or_else(|| syscall_leak("futex", r));
        n += 1;
    }
    (n, bad)
}

/// A wait syscall may only end with EINTR or EAGAIN; a kernel-internal
/// restart code (ERESTART*, 512..516) reaching user space means the
/// restart after restore went wrong.
fn syscall_leak(what: &str, r: libc::c_long) -> Option<String> {
    if r >= 0 {
        return None;
    }
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    (e != libc::EINTR && e != libc::EAGAIN).then(|| format!("{what} returned errno {e}"))
}

fn wait_busy() -> u64 {
    let mut n: u64 = 0;
    while !TERM.load(Ordering::Relaxed) {
        n = std::hint::black_box(n.wrapping_add(1));
    }
    n
}

/// Touches `depth` bytes of stack so that the [stack] VMA is already large
/// enough for everything the checks do later.
#[inline(never)]
fn prefault_stack(depth: usize) {
    let mut a = [0u8; 64 * 1024];
    for i in (0..a.len()).step_by(PAGE) {
        a[i] = 1;
    }
    std::hint::black_box(&mut a);
    if depth > a.len() {
        prefault_stack(depth - a.len());
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

fn log(msg: &str) {
    let line = format!("wl_single[{}]: {msg}\n", std::process::id());
    // Through stdout: the check "stdout offset == log size" needs stdout's
    // file description to be the last writer of the log.
    write_fd(1, line.as_bytes());
}

struct Args {
    corrupt: bool,
    drop_creds: bool,
    thread: bool,
    ready: PathBuf,
    verdict: PathBuf,
    wait: String,
    tmp: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut ready = None;
    let mut verdict = None;
    let mut wait = "nanosleep".to_string();
    let mut tmp = None;
    let mut corrupt = false;
    let mut drop_creds = false;
    let mut thread = false;
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{} needs a value", a.to_string_lossy()))
        };
        match a.to_str() {
            Some("--ready") => ready = Some(PathBuf::from(val()?)),
            Some("--verdict") => verdict = Some(PathBuf::from(val()?)),
            Some("--wait") => wait = val()?.to_string_lossy().into_owned(),
            Some("--tmp") => tmp = Some(PathBuf::from(val()?)),
            Some("--self-test-corrupt") => corrupt = true,
            Some("--drop-creds") => drop_creds = true,
            Some("--thread") => thread = true,
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    let ready = ready.ok_or("--ready is required")?;
    let verdict = verdict.ok_or("--verdict is required")?;
    if !["nanosleep", "pause", "busy", "futex"].contains(&wait.as_str()) {
        return Err(format!("bad --wait {wait}"));
    }
    let tmp = match tmp {
        Some(t) => t,
        None => ready
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/tmp")),
    };
    let tmp = std::fs::canonicalize(&tmp).map_err(|e| format!("--tmp {}: {e}", tmp.display()))?;
    Ok(Args {
        corrupt,
        drop_creds,
        thread,
        ready,
        verdict,
        wait,
        tmp,
    })
}

/// Everything recorded before the ready file is written.
struct Before {
    pid: u32,
    cmdline: Vec<u8>,
    exe: String,
    auxv: Vec<u8>,
    stat_mm: Vec<(usize, String)>,
    maps_len: usize,
    brk: usize,
    fs_base: u64,
    tls: u64,
    usr1: ActionInfo,
    term: ActionInfo,
    rt5: ActionInfo,
    blocked: Vec<c_int>,
    pending: Vec<c_int>,
    status_sig: Vec<String>,
    altstack: (usize, usize, c_int),
    itimer: TimerVal,
    timers_text: String,
    cwd: String,
    umask: u32,
    rlimits: Vec<(u64, u64)>,
    comm: String,
    personality: c_int,
    groups: Vec<libc::gid_t>,
    resuid: (u32, u32, u32),
    resgid: (u32, u32, u32),
    caps: Vec<String>,
    /// Uid, Gid, Groups and NoNewPrivs lines of /proc/self/status.
    creds: Vec<String>,
    dumpable: c_int,
    /// PR_GET_SECUREBITS.
    securebits: c_int,
    /// /proc/self/loginuid.
    loginuid: String,
    threads: String,
    getfl: [c_int; 3],
    fds: Vec<(String, String)>,
    mono: (i64, i64),
    /// advice_of(advised).
    advice: Vec<String>,
}

/// State set up by main and handed to the checks.
struct Setup {
    priv_anon: Region,
    shared_anon: Region,
    untouched: Region,
    /// One page per advice of ADVICE.
    advised: Region,
    /// GUARDED_PAGES pages of R_GUARDED, those of GUARD_AT guard pages.
    guarded: Region,
    /// Two pages of R_DROPPABLE mapped MAP_DROPPABLE (None: the kernel
    /// has no droppable mappings).
    droppable: Option<Region>,
    /// A read-only page sealed with mseal (None: the kernel cannot seal).
    sealed: Option<Region>,
    ro: Region,
    none: Region,
    /// Written with a pattern, then made PROT_NONE.
    none_filled: Region,
    /// Written with a pattern, then made PROT_READ|PROT_EXEC.
    rx: Region,
    altstack: Region,
    large: Region,
    heap_bufs: Vec<(usize, usize)>,
    priv_file: Region,
    priv_file_path: PathBuf,
    shared_file: Region,
    shared_file_path: PathBuf,
    timer: libc::timer_t,
    timer_sig: c_int,
    rt3: c_int,
    rseq: Option<usize>,
    creds_dropped: bool,
    thread: bool,
}

fn setup(args: &Args, ck: &mut Checker) -> Result<Setup, String> {
    // Descriptors: only 0, 1, 2.
    // SAFETY: closing descriptors we do not use; nothing in this process
    // owns them (std keeps none open).
    unsafe { libc::close_range(3, u32::MAX, 0) };
    // Keep the heap from shrinking behind our back and make the 8 MiB block
    // an mmap'ed chunk deterministically.
    // SAFETY: mallopt only changes allocator tunables.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }

    // Process attributes.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o027) };
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: l is a valid in/out pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max.min(1000);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            ck.fail(format!("setup: setrlimit(NOFILE): {}", errstr()));
        }
        libc::getrlimit(libc::RLIMIT_CORE, &mut l);
        l.rlim_cur = l.rlim_max.min(12345);
        if libc::setrlimit(libc::RLIMIT_CORE, &l) != 0 {
            ck.fail(format!("setup: setrlimit(CORE): {}", errstr()));
        }
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"wl-single".as_ptr()) };
    let p = personality_now();
    // SAFETY: only adds ADDR_NO_RANDOMIZE to the current persona.
    if unsafe { libc::personality((p | libc::ADDR_NO_RANDOMIZE) as libc::c_ulong) } < 0 {
        ck.fail(format!("setup: personality: {}", errstr()));
    }
    let gs: [libc::gid_t; 2] = [1234, 5678];
    // SAFETY: gs holds 2 gids.
    if unsafe { libc::setgroups(2, gs.as_ptr()) } != 0 {
        ck.fail(format!("setup: setgroups: {}", errstr()));
    }

    // Signals.
    let rt3 = libc::SIGRTMIN() + 3;
    let rt5 = libc::SIGRTMIN() + 5;
    set_action(
        libc::SIGTERM,
        on_term as extern "C" fn(c_int) as usize,
        0,
        &[],
    )?;
    set_action(
        libc::SIGUSR1,
        on_usr1 as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as usize,
        libc::SA_RESTART | libc::SA_SIGINFO | libc::SA_ONSTACK,
        &[libc::SIGUSR2],
    )?;
    set_action(
        rt5,
        on_rt5 as extern "C" fn(c_int) as usize,
        libc::SA_RESTART,
        &[],
    )?;
    set_action(
        libc::SIGVTALRM,
        on_vtalrm as extern "C" fn(c_int) as usize,
        libc::SA_RESTART,
        &[],
    )?;
    let block = sigset_of(&[libc::SIGUSR2, rt3]);
    // SAFETY: block is a valid set.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &block, std::ptr::null_mut()) };
    // SAFETY: sending blocked signals to ourselves; they stay pending.
    unsafe {
        if libc::kill(libc::getpid(), libc::SIGUSR2) != 0 {
            ck.fail(format!("setup: kill(SIGUSR2): {}", errstr()));
        }
        let v = libc::sigval {
            sival_ptr: SIGQUEUE_VALUE as *mut c_void,
        };
        if sigqueue(libc::getpid(), rt3, v) != 0 {
            ck.fail(format!("setup: sigqueue: {}", errstr()));
        }
    }

    // Alternate signal stack.
    let alt = Region::map(
        ALTSTACK_SIZE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    let ss = libc::stack_t {
        ss_sp: alt.ptr.cast(),
        ss_flags: 0,
        ss_size: ALTSTACK_SIZE,
    };
    // SAFETY: ss describes a 64 KiB mapping that is never unmapped.
    if unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) } != 0 {
        return Err(format!("sigaltstack: {}", errstr()));
    }

    // Timers.
    let it = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 500,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 1000,
            tv_usec: 0,
        },
    };
    // SAFETY: it is a valid itimerval.
    if unsafe { libc::setitimer(libc::ITIMER_VIRTUAL, &it, std::ptr::null_mut()) } != 0 {
        return Err(format!("setitimer: {}", errstr()));
    }
    // SAFETY: sigevent is plain data.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_SIGNAL;
    sev.sigev_signo = rt5;
    sev.sigev_value = libc::sigval {
        sival_ptr: TIMER_SIGEV_VALUE as *mut c_void,
    };
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: sev is initialised, timer is a valid out pointer.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
        return Err(format!("timer_create: {}", errstr()));
    }
    let ts = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 700,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: 1000,
            tv_nsec: 0,
        },
    };
    // SAFETY: timer is valid, ts initialised.
    if unsafe { libc::timer_settime(timer, 0, &ts, std::ptr::null_mut()) } != 0 {
        return Err(format!("timer_settime: {}", errstr()));
    }

    // Memory.
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let pa = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let priv_anon = Region::map(PRIV_ANON_PAGES * PAGE, rw, pa, -1)?;
    priv_anon.fill(R_PRIV_ANON);
    // Mapped here, between read-write neighbours, so that no neighbour has
    // the same protection (the maps checks want them as lines of their own).
    let none_filled = Region::map(NONE_FILLED_PAGES * PAGE, rw, pa, -1)?;
    none_filled.fill(R_NONE_FILLED);
    none_filled.protect(libc::PROT_NONE)?;
    let rx = Region::map(RX_PAGES * PAGE, rw, pa, -1)?;
    rx.fill(R_RX);
    rx.protect(libc::PROT_READ | libc::PROT_EXEC)?;
    let shared_anon = Region::map(
        SHARED_ANON_PAGES * PAGE,
        rw,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        -1,
    )?;
    shared_anon.fill(R_SHARED_ANON);
    let untouched = Region::map(UNTOUCHED_PAGES * PAGE, rw, pa, -1)?;
    // One page per advice (each its own mapping, by its flags), filled.
    let advised = Region::map(ADVICE.len() * PAGE, rw, pa, -1)?;
    advised.fill(R_ADVISED);
    for (i, (adv, _)) in ADVICE.iter().enumerate() {
        // SAFETY: madvise on one page of our own mapping.
        let r = unsafe { libc::madvise(advised.ptr.add(i * PAGE).cast(), PAGE, *adv) };
        // KSM (MADV_MERGEABLE) may be absent from the kernel.
        if r != 0 && *adv != libc::MADV_MERGEABLE {
            return Err(format!("madvise({adv}): {}", errstr()));
        }
    }
    let guarded = Region::map(GUARDED_PAGES * PAGE, rw, pa, -1)?;
    guarded.fill(R_GUARDED);
    for p in GUARD_AT {
        // SAFETY: madvise on one page of our own mapping, which nothing
        // touches again (the checks skip it).
        if unsafe { libc::madvise(guarded.ptr.add(p * PAGE).cast(), PAGE, MADV_GUARD_INSTALL) } != 0
        {
            return Err(format!("madvise(MADV_GUARD_INSTALL): {}", errstr()));
        }
    }
    let sealed = Region::map(PAGE, libc::PROT_READ, pa, -1)?;
    // SAFETY: mseal of our own mapping, which stays as it is for good.
    let sealed = (unsafe { libc::syscall(SYS_MSEAL, sealed.ptr, PAGE, 0) } == 0).then_some(sealed);
    let droppable = Region::map(2 * PAGE, rw, MAP_DROPPABLE | libc::MAP_ANONYMOUS, -1).ok();
    if let Some(d) = &droppable {
        d.fill(R_DROPPABLE);
    }
    let ro = Region::map(RO_PAGES * PAGE, rw, pa, -1)?;
    ro.fill(R_RO);
    // SAFETY: ro is our own mapping of that length.
    if unsafe { libc::mprotect(ro.ptr.cast(), ro.len, libc::PROT_READ) } != 0 {
        return Err(format!("mprotect: {}", errstr()));
    }
    let none = Region::map(NONE_PAGES * PAGE, libc::PROT_NONE, pa, -1)?;

    let mut heap_bufs = Vec::new();
    for (n, size) in [
        16usize, 24, 40, 100, 256, 1000, 4000, 4096, 10000, 30000, 100000, 250000,
    ]
    .iter()
    .enumerate()
    {
        // SAFETY: plain malloc; the result is checked and never freed.
        let p = unsafe { libc::malloc(*size) } as *mut u8;
        if p.is_null() {
            return Err(format!("malloc({size}) failed"));
        }
        for i in 0..*size {
            // SAFETY: i < size, inside the allocation.
            unsafe { *p.add(i) = heap_byte(n, i) };
        }
        heap_bufs.push((p as usize, *size));
    }
    // SAFETY: plain malloc, checked; never freed.
    let lp = unsafe { libc::malloc(LARGE_MALLOC) } as *mut u8;
    if lp.is_null() {
        return Err("malloc(8 MiB) failed".into());
    }
    let large = Region {
        ptr: lp,
        len: LARGE_MALLOC,
    };
    large.fill(R_LARGE);

    // SAFETY: single-threaded; no references to the statics are alive.
    unsafe {
        let d = &raw mut DATA_ARR;
        for i in (0..DATA_WORDS).step_by(2) {
            (*d)[i] ^= 0xdead_beef_0000_0000;
        }
        let b = &raw mut BSS_ARR;
        for i in 0..BSS_WORDS {
            (*b)[i] = pat(R_BSS, i * 8 / PAGE, i % (PAGE / 8));
        }
    }
    TLS_VAL.with(|v| v.set(0x7115_0000_dead_beef ^ u64::from(std::process::id())));

    // File mappings.
    let priv_file_path = args.tmp.join("wl-private.dat");
    std::fs::write(
        &priv_file_path,
        bytes_of_pattern(R_FILE_PRIV_CONTENT, PRIV_FILE_PAGES),
    )
    .map_err(|e| format!("write {}: {e}", priv_file_path.display()))?;
    let shared_file_path = args.tmp.join("wl-shared.dat");
    std::fs::write(
        &shared_file_path,
        bytes_of_pattern(R_FILE_SHARED_INIT, SHARED_FILE_PAGES),
    )
    .map_err(|e| format!("write {}: {e}", shared_file_path.display()))?;
    let map_file = |path: &Path, len: usize, flags: c_int| -> Result<Region, String> {
        let c = cstr(path);
        // SAFETY: c is NUL-terminated.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!("open {}: {}", path.display(), errstr()));
        }
        let r = Region::map(len, rw, flags, fd);
        // SAFETY: fd was opened above; the mapping keeps its own reference.
        unsafe { libc::close(fd) };
        r
    };
    let priv_file = map_file(&priv_file_path, PRIV_FILE_PAGES * PAGE, libc::MAP_PRIVATE)?;
    let shared_file = map_file(
        &shared_file_path,
        SHARED_FILE_PAGES * PAGE,
        libc::MAP_SHARED,
    )?;
    // Read some clean pages of the private file mapping, dirty pages 2 and 5.
    let w = priv_file.words();
    let mut sum = 0u64;
    for p in [0usize, 1, 7, 15] {
        sum = sum.wrapping_add(w[p * PAGE / 8]);
    }
    std::hint::black_box(sum);
    for &p in &PRIV_FILE_DIRTY {
        let words = &mut priv_file.words_mut()[p * PAGE / 8..(p + 1) * PAGE / 8];
        for (i, x) in words.iter_mut().enumerate() {
            *x = pat(R_FILE_PRIV_DIRTY, p, i);
        }
    }
    shared_file.fill(R_FILE_SHARED_WRITTEN);

    // rseq.
    let rseq = rseq_area();
    match rseq {
        None => ck.fail("setup: glibc did not register rseq (__rseq_size == 0)"),
        Some(p) => {
            let e = rseq_reregister(p);
            if e != libc::EBUSY {
                ck.fail(format!(
                    "setup: rseq re-registration gave errno {e}, expected EBUSY"
                ));
            }
            let v = rseq_sentinel_probe(p);
            if v == CPU_ID_SENTINEL {
                ck.fail("setup: the kernel did not overwrite rseq cpu_id_start after a signal");
            }
        }
    }

    // cwd.
    std::env::set_current_dir(&args.tmp)
        .map_err(|e| format!("chdir {}: {e}", args.tmp.display()))?;

    if args.thread {
        start_sleeper_thread()?;
    }
    // An audit login uid (root may set it; only the process itself can).
    if let Err(e) = std::fs::write("/proc/self/loginuid", LOGINUID.to_string()) {
        log(&format!(
            "cannot set /proc/self/loginuid ({e}): not checked"
        ));
    }
    if args.drop_creds {
        // After the drop the process still writes the ready and verdict
        // files (write to a temporary name, then rename: it needs their
        // directories) and preads the mapped files by path. The log is only
        // written through the inherited descriptor and read by path (0644).
        let dir_of = |p: &Path| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut paths = vec![
            dir_of(&args.ready),
            dir_of(&args.verdict),
            priv_file_path.clone(),
            shared_file_path.clone(),
        ];
        paths.dedup();
        drop_creds(&paths)?;
    }

    Ok(Setup {
        priv_anon,
        shared_anon,
        untouched,
        advised,
        guarded,
        droppable,
        sealed,
        ro,
        none,
        none_filled,
        rx,
        altstack: alt,
        large,
        heap_bufs,
        priv_file,
        priv_file_path,
        shared_file,
        shared_file_path,
        timer,
        timer_sig: rt5,
        rt3,
        rseq,
        creds_dropped: args.drop_creds,
        thread: args.thread,
    })
}

fn snapshot(s: &Setup) -> Before {
    Before {
        pid: std::process::id(),
        cmdline: read_bytes("/proc/self/cmdline"),
        exe: readlink("/proc/self/exe"),
        auxv: read_bytes("/proc/self/auxv"),
        stat_mm: stat_mm_fields(),
        maps_len: 0,
        // SAFETY: brk(0) only queries the current program break.
        brk: unsafe { libc::syscall(libc::SYS_brk, 0) } as usize,
        fs_base: fs_base(),
        tls: TLS_VAL.with(|v| v.get()),
        usr1: get_action(libc::SIGUSR1),
        term: get_action(libc::SIGTERM),
        rt5: get_action(s.timer_sig),
        blocked: blocked_mask(),
        pending: pending(),
        status_sig: status_lines(&["SigBlk", "SigIgn", "SigCgt"]),
        altstack: altstack(),
        itimer: itimer_virtual(),
        timers_text: read_text("/proc/self/timers"),
        cwd: std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| e.to_string()),
        umask: cur_umask(),
        rlimits: rlimits(),
        comm: comm(),
        personality: personality_now(),
        groups: groups(),
        resuid: resuid(),
        resgid: resgid(),
        caps: status_lines(&["Cap"]),
        creds: status_lines(&["Uid:", "Gid:", "Groups:", "NoNewPrivs:"]),
        dumpable: dumpable(),
        securebits: securebits(),
        loginuid: read_text("/proc/self/loginuid"),
        threads: status_field("Threads"),
        getfl: [getfl(0), getfl(1), getfl(2)],
        fds: fd_list(),
        mono: monotonic(),
        advice: advice_of(&s.advised),
    }
}

/// Sanity checks of the setup itself, done on the "before" values (so that
/// a broken setup cannot make the after-checks pass by accident).
fn check_before(b: &Before, s: &Setup, maps: &[u8], ck: &mut Checker) {
    let e = maps_entries(maps);
    match maps_line_at(&e, s.none.addr()) {
        Some(l) if l.1 == "---p" => {}
        other => ck.fail(format!("setup: PROT_NONE area not ---p in maps: {other:?}")),
    }
    match maps_line_at(&e, s.ro.addr()) {
        Some(l) if l.1 == "r--p" => {}
        other => ck.fail(format!("setup: read-only area not r--p in maps: {other:?}")),
    }
    check_vma(
        ck,
        "setup: filled PROT_NONE area",
        &e,
        &s.none_filled,
        "---p",
    );
    check_vma(ck, "setup: PROT_READ|PROT_EXEC area", &e, &s.rx, "r-xp");
    let want_threads = if s.thread { "2" } else { "1" };
    if b.threads != want_threads {
        ck.fail(format!(
            "setup: {} threads, expected {want_threads}",
            b.threads
        ));
    }
    if b.dumpable != 1 {
        ck.fail(format!("setup: dumpable is {}, expected 1", b.dumpable));
    }
    if s.creds_dropped {
        let id = (DROP_ID, DROP_ID, DROP_ID);
        if b.resuid != id || b.resgid != id {
            ck.fail(format!(
                "setup: after --drop-creds uids {:?}, gids {:?}",
                b.resuid, b.resgid
            ));
        }
        let zero = "0000000000000000";
        for c in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            let line = format!("{c}:\t{zero}");
            if !b.caps.contains(&line) {
                ck.fail(format!(
                    "setup: after --drop-creds no {line:?} in {:?}",
                    b.caps
                ));
            }
        }
        if !b.creds.iter().any(|l| l == "NoNewPrivs:\t1") {
            ck.fail(format!(
                "setup: after --drop-creds NoNewPrivs is not 1: {:?}",
                b.creds
            ));
        }
    }
    match maps_line_at(&e, s.shared_anon.addr()) {
        Some(l) if l.1 == "rw-s" => {}
        other => ck.fail(format!(
            "setup: shared anon area not rw-s in maps: {other:?}"
        )),
    }
    match maps_line_at(&e, s.large.addr()) {
        Some(l) if l.3 != "[heap]" => {}
        other => ck.fail(format!("setup: 8 MiB malloc is not mmap'ed: {other:?}")),
    }
    for &(p, n) in &s.heap_bufs {
        match maps_line_at(&e, p) {
            Some(l) if l.3 == "[heap]" => {}
            other => ck.fail(format!(
                "setup: malloc({n}) at {p:#x} is not in [heap]: {other:?}"
            )),
        }
    }
    for name in ["[vdso]", "[stack]", "[heap]"] {
        if !e.iter().any(|l| l.3 == name) {
            ck.fail(format!("setup: no {name} in maps"));
        }
    }
    let mut want_pending = vec![libc::SIGUSR2, s.rt3];
    want_pending.sort();
    if b.pending != want_pending {
        ck.fail(format!("setup: pending signals are {:?}", b.pending));
    }
    if b.fds.iter().map(|f| f.0.as_str()).collect::<Vec<_>>() != ["0", "1", "2"] {
        ck.fail(format!(
            "setup: open descriptors are {:?}, expected only 0, 1, 2",
            b.fds
        ));
    }
    if b.fds.first().map(|f| f.1.as_str()) != Some("/dev/null") {
        ck.fail(format!("setup: stdin is not /dev/null: {:?}", b.fds));
    }
    for fd in [1, 2] {
        if getfl(fd) & libc::O_APPEND == 0 {
            ck.fail(format!("setup: fd {fd} is not O_APPEND"));
        }
    }
    if b.timers_text.is_empty() {
        ck.fail("setup: /proc/self/timers is empty");
    }
    if b.groups != [1234, 5678] {
        ck.fail(format!("setup: groups are {:?}", b.groups));
    }
}

fn check_after(
    b: &Before,
    s: &Setup,
    maps_before: &[u8],
    maps_after: &[u8],
    stack_arr: &[u64; 512],
    ck: &mut Checker,
) {
    // Identity and mm fields.
    ck.eq("getpid", b.pid, std::process::id());
    ck.eq(
        "/proc/self/cmdline",
        &b.cmdline,
        &read_bytes("/proc/self/cmdline"),
    );
    ck.eq("/proc/self/exe", &b.exe, &readlink("/proc/self/exe"));
    let auxv = read_bytes("/proc/self/auxv");
    if auxv != b.auxv {
        let i = auxv
            .iter()
            .zip(&b.auxv)
            .position(|(x, y)| x != y)
            .unwrap_or(auxv.len().min(b.auxv.len()));
        ck.fail(format!(
            "/proc/self/auxv: differs at byte {i} (len before {}, after {})",
            b.auxv.len(),
            auxv.len()
        ));
    }
    let st = stat_mm_fields();
    for ((n, x), (_, y)) in b.stat_mm.iter().zip(&st) {
        ck.eq(&format!("/proc/self/stat field {n}"), x, y);
    }

    // maps.
    let e0 = maps_entries(maps_before);
    let e1 = maps_entries(maps_after);
    for i in 0..e0.len().max(e1.len()) {
        let (x, y) = (e0.get(i), e1.get(i));
        if x != y {
            ck.fail(format!(
                "/proc/self/maps: first difference at line {i}: before {x:?}, after {y:?} ({} lines before, {} after)",
                e0.len(),
                e1.len()
            ));
            break;
        }
    }
    match maps_line_at(&e1, s.none.addr()) {
        Some(l) if l.1 == "---p" => {}
        other => ck.fail(format!(
            "PROT_NONE area: maps line {other:?}, expected ---p"
        )),
    }
    check_vma(ck, "filled PROT_NONE area", &e1, &s.none_filled, "---p");
    check_vma(ck, "PROT_READ|PROT_EXEC area", &e1, &s.rx, "r-xp");
    // SAFETY: brk(0) only queries.
    ck.eq("brk", b.brk, unsafe { libc::syscall(libc::SYS_brk, 0) }
        as usize);

    // Memory contents.
    check_words(
        ck,
        "private anon mapping",
        s.priv_anon.words(),
        R_PRIV_ANON,
        0,
    );
    check_words(
        ck,
        "shared anon mapping",
        s.shared_anon.words(),
        R_SHARED_ANON,
        0,
    );
    if let Some(i) = s.untouched.words().iter().position(|&w| w != 0) {
        ck.fail(format!(
            "untouched anon mapping: word {i} (page {}) is {:#x}, expected 0",
            i * 8 / PAGE,
            s.untouched.words()[i]
        ));
    }
    check_words(ck, "read-only anon mapping", s.ro.words(), R_RO, 0);
    check_words(ck, "madvised anon mapping", s.advised.words(), R_ADVISED, 0);
    ck.eq(
        "madvise advice (smaps VmFlags)",
        &b.advice,
        &advice_of(&s.advised),
    );
    check_guards(ck, s);
    check_words(ck, "r-x anon mapping", s.rx.words(), R_RX, 0);
    // The task could not read these pages when it was dumped: their
    // contents must have been saved all the same. (maps was read already.)
    match s.none_filled.protect(libc::PROT_READ) {
        Ok(()) => check_words(
            ck,
            "PROT_NONE anon mapping (made readable after restore)",
            s.none_filled.words(),
            R_NONE_FILLED,
            0,
        ),
        Err(e) => ck.fail(format!("PROT_NONE anon mapping: {e}")),
    }
    check_words(ck, "8 MiB malloc", s.large.words(), R_LARGE, 0);
    for (n, &(p, size)) in s.heap_bufs.iter().enumerate() {
        for i in 0..size {
            // SAFETY: the buffer was malloc'ed with `size` bytes and never freed.
            let got = unsafe { std::ptr::read_volatile((p as *const u8).add(i)) };
            if got != heap_byte(n, i) {
                ck.fail(format!("heap buffer {n} (malloc({size}) at {p:#x}): byte {i}: expected {:#04x}, found {got:#04x}", heap_byte(n, i)));
                break;
            }
        }
    }
    for (i, w) in stack_arr.iter().enumerate() {
        // SAFETY: w is a valid reference.
        let got = unsafe { std::ptr::read_volatile(w) };
        if got != pat(R_STACK, 0, i) {
            ck.fail(format!(
                "stack array of main: word {i}: expected {:#x}, found {got:#x}",
                pat(R_STACK, 0, i)
            ));
            break;
        }
    }
    // SAFETY: single-threaded; the statics are only read here, through raw
    // pointers within their bounds, and no mutable reference to them exists.
    unsafe {
        let d = (&raw const DATA_ARR).cast::<u64>();
        let init = data_init();
        for (i, &v) in init.iter().enumerate() {
            let want = if i % 2 == 0 {
                v ^ 0xdead_beef_0000_0000
            } else {
                v
            };
            let got = std::ptr::read_volatile(d.add(i));
            if got != want {
                ck.fail(format!(
                    ".data array: word {i}: expected {want:#x}, found {got:#x}"
                ));
                break;
            }
        }
        let bss = std::slice::from_raw_parts((&raw const BSS_ARR).cast::<u64>(), BSS_WORDS);
        check_words(ck, ".bss array", bss, R_BSS, 0);
    }
    ck.eq("thread-local value", b.tls, TLS_VAL.with(|v| v.get()));
    ck.eq("fs_base", b.fs_base, fs_base());

    // Private file mapping.
    let w = s.priv_file.words();
    for p in 0..PRIV_FILE_PAGES {
        let words = &w[p * PAGE / 8..(p + 1) * PAGE / 8];
        if PRIV_FILE_DIRTY.contains(&p) {
            for (i, &x) in words.iter().enumerate() {
                if x != pat(R_FILE_PRIV_DIRTY, p, i) {
                    ck.fail(format!("private file mapping: written page {p} word {i}: expected {:#x}, found {x:#x}", pat(R_FILE_PRIV_DIRTY, p, i)));
                    break;
                }
            }
        } else {
            check_words(
                ck,
                &format!("private file mapping page {p}"),
                words,
                R_FILE_PRIV_CONTENT,
                p,
            );
        }
    }
    match pread_file(&s.priv_file_path, PRIV_FILE_PAGES * PAGE) {
        Ok(b) => check_words(
            ck,
            "private mapped file on disk",
            &words_of(&b),
            R_FILE_PRIV_CONTENT,
            0,
        ),
        Err(e) => ck.fail(format!("private mapped file: {e}")),
    }
    // Shared file mapping.
    check_words(
        ck,
        "shared file mapping",
        s.shared_file.words(),
        R_FILE_SHARED_WRITTEN,
        0,
    );
    match pread_file(&s.shared_file_path, SHARED_FILE_PAGES * PAGE) {
        Ok(b) => check_words(
            ck,
            "shared mapped file via pread",
            &words_of(&b),
            R_FILE_SHARED_WRITTEN,
            0,
        ),
        Err(e) => ck.fail(format!("shared mapped file: {e}")),
    }
    {
        let page = 3;
        let words = &mut s.shared_file.words_mut()[page * PAGE / 8..(page + 1) * PAGE / 8];
        for (i, x) in words.iter_mut().enumerate() {
            *x = pat(R_FILE_SHARED_AFTER, page, i);
        }
        // SAFETY: msync on our own shared mapping.
        if unsafe { libc::msync(s.shared_file.ptr.cast(), s.shared_file.len, libc::MS_SYNC) } != 0 {
            ck.fail(format!("shared file mapping: msync: {}", errstr()));
        }
        match pread_file(&s.shared_file_path, SHARED_FILE_PAGES * PAGE) {
            Ok(b) => {
                let ws = words_of(&b);
                check_words(
                    ck,
                    "shared file: write after restore, seen by pread",
                    &ws[page * PAGE / 8..(page + 1) * PAGE / 8],
                    R_FILE_SHARED_AFTER,
                    page,
                );
                check_words(
                    ck,
                    "shared file: page 0 via pread after the new write",
                    &ws[..PAGE / 8],
                    R_FILE_SHARED_WRITTEN,
                    0,
                );
            }
            Err(e) => ck.fail(format!("shared mapped file: {e}")),
        }
    }

    // vDSO.
    let m = monotonic();
    ck.ok(
        "clock_gettime(CLOCK_MONOTONIC) via vDSO",
        m > b.mono,
        || format!("{m:?} is not later than {:?} before", b.mono),
    );
    let raw = monotonic_raw_syscall();
    let diff = (raw.0 - m.0) as f64 + (raw.1 - m.1) as f64 / 1e9;
    ck.ok(
        "vDSO clock vs syscall clock",
        (0.0..1.0).contains(&diff),
        || format!("vDSO {m:?}, syscall {raw:?}"),
    );

    // Signals.
    ck.eq("sigaction(SIGUSR1)", &b.usr1, &get_action(libc::SIGUSR1));
    ck.eq("sigaction(SIGTERM)", &b.term, &get_action(libc::SIGTERM));
    ck.eq("sigaction(SIGRTMIN+5)", &b.rt5, &get_action(s.timer_sig));
    ck.eq("blocked signal mask", &b.blocked, &blocked_mask());
    ck.eq(
        "/proc/self/status SigBlk/SigIgn/SigCgt",
        &b.status_sig,
        &status_lines(&["SigBlk", "SigIgn", "SigCgt"]),
    );
    ck.eq("pending signals (sigpending)", &b.pending, &pending());
    {
        let set = sigset_of(&[libc::SIGUSR2, s.rt3]);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut got_usr2 = false;
        let mut got_rt3 = false;
        for _ in 0..3 {
            // SAFETY: siginfo_t is plain data.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: set, info, zero are valid.
            let sig = unsafe { libc::sigtimedwait(&set, &mut info, &zero) };
            if sig < 0 {
                break;
            }
            // SAFETY: for SI_USER/SI_QUEUE the pid and value fields are valid.
            let (pid, val) = unsafe { (info.si_pid(), info.si_value().sival_ptr as usize) };
            if sig == libc::SIGUSR2 {
                got_usr2 = true;
                ck.ok(
                    "pending SIGUSR2 siginfo",
                    info.si_code == libc::SI_USER && pid as u32 == b.pid,
                    || format!("si_code {}, si_pid {pid}", info.si_code),
                );
            } else if sig == s.rt3 {
                got_rt3 = true;
                ck.ok(
                    "pending SIGRTMIN+3 siginfo",
                    info.si_code == libc::SI_QUEUE && val == SIGQUEUE_VALUE && pid as u32 == b.pid,
                    || format!("si_code {}, si_value {val:#x}, si_pid {pid}", info.si_code),
                );
            } else {
                ck.fail(format!("sigtimedwait returned unexpected signal {sig}"));
            }
        }
        ck.ok("sigtimedwait(SIGUSR2)", got_usr2, || "not pending".into());
        ck.ok("sigtimedwait(SIGRTMIN+3)", got_rt3, || "not pending".into());
    }
    ck.eq("sigaltstack", b.altstack, altstack());
    let c0 = USR1_COUNT.load(Ordering::SeqCst);
    USR1_LAST_SIGNO.store(0, Ordering::SeqCst);
    // SAFETY: raise is async-signal-safe; SIGUSR1 has a handler.
    unsafe { libc::raise(libc::SIGUSR1) };
    ck.ok(
        "raise(SIGUSR1) runs the handler",
        USR1_COUNT.load(Ordering::SeqCst) == c0 + 1,
        || format!("count {} -> {}", c0, USR1_COUNT.load(Ordering::SeqCst)),
    );
    ck.ok(
        "SIGUSR1 handler siginfo",
        USR1_LAST_SIGNO.load(Ordering::SeqCst) == libc::SIGUSR1
            && USR1_LAST_CODE.load(Ordering::SeqCst) == libc::SI_TKILL,
        || {
            format!(
                "signo {}, code {}",
                USR1_LAST_SIGNO.load(Ordering::SeqCst),
                USR1_LAST_CODE.load(Ordering::SeqCst)
            )
        },
    );
    let sp = USR1_LAST_SP.load(Ordering::SeqCst);
    ck.ok(
        "SIGUSR1 handler ran on the alternate stack",
        sp >= s.altstack.addr() && sp < s.altstack.addr() + s.altstack.len,
        || {
            format!(
                "handler stack {sp:#x}, altstack {:#x}+{:#x}",
                s.altstack.addr(),
                s.altstack.len
            )
        },
    );

    // Timers.
    let (iv, val) = itimer_virtual();
    ck.ok("ITIMER_VIRTUAL interval", iv == (500, 0), || {
        format!("{iv:?} (before {:?})", b.itimer)
    });
    ck.ok(
        "ITIMER_VIRTUAL value",
        // It only runs down (with user CPU time); setitimer adds one
        // scheduler tick, so the value read right after it is the bound
        // (1 ms of slack for the restorer's measurement of that tick; a
        // tick gained at every restore is 4 ms here).
        val > (0, 0) && val <= add_usec(b.itimer.1, 1000),
        || format!("{val:?} (before {:?})", b.itimer),
    );
    match posix_timer(s.timer) {
        Ok((iv, val)) => {
            ck.ok("POSIX timer interval", iv == (700, 0), || format!("{iv:?}"));
            ck.ok(
                "POSIX timer value",
                val > (0, 0) && val <= (1000, 0),
                || format!("{val:?}"),
            );
        }
        Err(e) => ck.fail(format!("timer_gettime(timer id {}): {e}", s.timer as usize)),
    }
    let timers = read_text("/proc/self/timers");
    ck.eq("/proc/self/timers", &b.timers_text, &timers);
    let id_line = format!("ID: {}", s.timer as usize);
    let sig_line = format!("signal: {}/", s.timer_sig);
    ck.ok(
        "/proc/self/timers lists the timer",
        timers.lines().any(|l| l == id_line) && timers.contains(&sig_line),
        || format!("no {id_line:?} with {sig_line:?} in {timers:?}"),
    );

    // rseq.
    match s.rseq {
        None => ck.fail("rseq: not registered"),
        Some(p) => {
            let e = rseq_reregister(p);
            ck.ok("rseq re-registration with the same arguments", e == libc::EBUSY, || {
                format!("errno {e} ({}), expected EBUSY: rseq not registered at {p:#x} after restore", std::io::Error::from_raw_os_error(e))
            });
            let v = rseq_sentinel_probe(p);
            ck.ok(
                "rseq cpu_id_start updated by the kernel",
                v != CPU_ID_SENTINEL,
                || "still holds the sentinel after a signal".into(),
            );
            let (_, cpu) = rseq_cpu_fields(p);
            ck.ok("rseq cpu_id", cpu < 65536, || format!("{cpu:#x}"));
        }
    }

    // Misc process state.
    ck.eq(
        "cwd",
        &b.cwd,
        &std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| e.to_string()),
    );
    ck.eq("umask", b.umask, cur_umask());
    let rl = rlimits();
    for (r, (x, y)) in b.rlimits.iter().zip(&rl).enumerate() {
        ck.eq(&format!("rlimit {r}"), x, y);
    }
    ck.eq("comm", &b.comm, &comm());
    ck.eq("personality", b.personality, personality_now());
    ck.eq("getgroups", &b.groups, &groups());
    ck.eq("getresuid", b.resuid, resuid());
    ck.eq("getresgid", b.resgid, resgid());
    ck.eq("capabilities", &b.caps, &status_lines(&["Cap"]));
    ck.eq(
        "/proc/self/status Uid/Gid/Groups/NoNewPrivs",
        &b.creds,
        &status_lines(&["Uid:", "Gid:", "Groups:", "NoNewPrivs:"]),
    );
    ck.eq("dumpable", b.dumpable, dumpable());
    ck.eq("securebits", b.securebits, securebits());
    ck.eq(
        "/proc/self/loginuid",
        &b.loginuid,
        &read_text("/proc/self/loginuid"),
    );
    if s.creds_dropped && b.securebits != DROP_SECUREBITS {
        ck.fail(format!(
            "setup: securebits are {:#x}, expected {DROP_SECUREBITS:#x}",
            b.securebits
        ));
    }
    ck.eq("threads", &b.threads, &status_field("Threads"));
    ck.eq("TracerPid", "0".to_string(), status_field("TracerPid"));

    // Descriptors.
    ck.eq(
        "F_GETFL of 0, 1, 2",
        b.getfl,
        [getfl(0), getfl(1), getfl(2)],
    );
    ck.eq("open descriptors", &b.fds, &fd_list());
    let off = fd_offset(1);
    let size = fd_size(1);
    ck.ok("stdout offset equals the log size", off == size, || {
        format!("offset {off}, size {size}")
    });
    let line = format!(
        "wl_single[{}]: restored and checked, writing after restore\n",
        b.pid
    );
    let n = write_fd(1, line.as_bytes());
    ck.ok(
        "write to stdout after restore",
        n == line.len() as isize,
        || format!("wrote {n}: {}", errstr()),
    );
    let size2 = fd_size(1);
    ck.ok(
        "stdout write lands at the end of the log",
        size2 == size + line.len() as i64,
        || format!("size {size} -> {size2}"),
    );
    let log_path = readlink("/proc/self/fd/1");
    match std::fs::read(&log_path) {
        Ok(c) => ck.ok(
            "log ends with the line written after restore",
            c.ends_with(line.as_bytes()),
            || format!("{log_path} does not end with it"),
        ),
        Err(e) => ck.fail(format!("read log {log_path}: {e}")),
    }

    // The allocator still works: many sizes, brk and mmap'ed.
    let mut ptrs = Vec::new();
    for (k, size) in (0..24)
        .map(|i| 1usize << i)
        .chain([3, 17, 33, 127, 4095, 4097, 100_000, 3 << 20])
        .enumerate()
    {
        // SAFETY: plain malloc, checked below.
        let p = unsafe { libc::malloc(size) } as *mut u8;
        if p.is_null() {
            ck.fail(format!("malloc({size}) after restore returned NULL"));
            continue;
        }
        // SAFETY: p points to size bytes.
        unsafe { std::ptr::write_bytes(p, k as u8 | 1, size) };
        ptrs.push((p, size, k as u8 | 1));
    }
    for &(p, size, v) in &ptrs {
        // SAFETY: p points to size initialised bytes.
        let sl = unsafe { std::slice::from_raw_parts(p, size) };
        if let Some(i) = sl.iter().position(|&x| x != v) {
            ck.fail(format!("malloc({size}) after restore: byte {i} changed"));
        }
        // SAFETY: p came from malloc and is freed once.
        unsafe { libc::free(p.cast()) };
    }
    let mut small: Vec<*mut c_void> = Vec::new();
    for i in 0..2000 {
        // SAFETY: plain malloc; freed below.
        small.push(unsafe { libc::malloc(16 + i % 300) });
    }
    for p in small {
        // SAFETY: p came from malloc (or is NULL) and is freed once.
        unsafe { libc::free(p) };
    }
    // The old heap buffers survived the new allocations.
    for (n, &(p, size)) in s.heap_bufs.iter().enumerate() {
        // SAFETY: still allocated, size bytes.
        let sl = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
        if (0..size).any(|i| sl[i] != heap_byte(n, i)) {
            ck.fail(format!(
                "heap buffer {n} changed by malloc/free after restore"
            ));
        }
    }
}

/// `--self-test-corrupt`: damages some state after the wait, to prove that
/// the checks notice (the verdict must then list those failures).
fn corrupt(s: &Setup) {
    s.priv_anon.words_mut()[3 * PAGE / 8 + 7] ^= 1;
    s.shared_anon.words_mut()[5] ^= 1;
    // SAFETY: the untouched region is our own writable mapping.
    unsafe { *s.untouched.ptr.add(100 * PAGE) = 1 };
    // SAFETY: single-threaded; a raw pointer write into our own static.
    unsafe { *(&raw mut BSS_ARR).cast::<u64>().add(77) ^= 1 };
    TLS_VAL.with(|v| v.set(v.get() ^ 1));
    // SAFETY: the following calls only change this process's own state.
    unsafe {
        libc::umask(0o022);
        let set = sigset_of(&[libc::SIGHUP]);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        let ts = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 701,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 1000,
                tv_nsec: 0,
            },
        };
        libc::timer_settime(s.timer, 0, &ts, std::ptr::null_mut());
        let gs: [libc::gid_t; 1] = [1234];
        libc::setgroups(1, gs.as_ptr());
        libc::prctl(libc::PR_SET_NAME, c"wl-changed".as_ptr());
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wl_single: {e}");
            std::process::exit(2);
        }
    };
    let mut ck = Checker { fails: Vec::new() };
    let s = match setup(&args, &mut ck) {
        Ok(s) => s,
        Err(e) => {
            log(&format!("setup failed: {e}"));
            let _ = write_atomic(&args.verdict, format!("FAIL: setup: {e}\n").as_bytes());
            std::process::exit(2);
        }
    };
    let mut stack_arr = [0u64; 512];
    for (i, w) in stack_arr.iter_mut().enumerate() {
        *w = pat(R_STACK, 0, i);
    }
    std::hint::black_box(&mut stack_arr);
    prefault_stack(1 << 20);

    let mut maps_before = vec![0u8; MAPS_BUF];
    let mut maps_after = vec![0u8; MAPS_BUF];
    maps_after.fill(1);
    log(&format!("set up, wait mode {}", args.wait));
    let mut before = snapshot(&s);
    ck.fails.reserve(64);
    // Sanity checks of the setup, on a scratch copy of maps.
    match read_into(c"/proc/self/maps", &mut maps_after) {
        Ok(n) => check_before(&before, &s, &maps_after[..n], &mut ck),
        Err(e) => ck.fail(format!("setup: {e}")),
    }
    // Leave free room at the top of the heap, so that the few small
    // allocations between the maps snapshot and the maps check (and the
    // allocator tunables above forbid trimming) never move the break.
    // SAFETY: plain malloc/free of a block below the mmap threshold.
    unsafe { libc::free(libc::malloc(900 * 1024)) };
    // Last: maps, after every allocation of the setup.
    match read_into(c"/proc/self/maps", &mut maps_before) {
        Ok(n) => before.maps_len = n,
        Err(e) => ck.fail(format!("setup: {e}")),
    }
    // SAFETY: brk(0) only queries the current program break.
    before.brk = unsafe { libc::syscall(libc::SYS_brk, 0) } as usize;
    if let Err(e) = write_atomic(&args.ready, b"ready\n") {
        log(&format!("cannot write ready file: {e}"));
        std::process::exit(2);
    }

    let mut wait_fail = None;
    let rounds = match args.wait.as_str() {
        "nanosleep" => {
            let (r, f) = wait_nanosleep();
            wait_fail = f;
            r
        }
        "pause" | "futex" => {
            let (r, f) = if args.wait == "pause" {
                wait_pause()
            } else {
                wait_futex()
            };
            wait_fail = f;
            r
        }
        _ => wait_busy(),
    };

    if args.corrupt {
        corrupt(&s);
    }
    // First: maps, before anything allocates.
    let maps_after_len = match read_into(c"/proc/self/maps", &mut maps_after) {
        Ok(n) => n,
        Err(e) => {
            ck.fail(format!("maps after: {e}"));
            0
        }
    };
    if let Some(f) = wait_fail {
        ck.fail(f);
    }
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_after(
            &before,
            &s,
            &maps_before[..before.maps_len],
            &maps_after[..maps_after_len],
            &stack_arr,
            &mut ck,
        );
    }));
    if res.is_err() {
        ck.fail("panic during the checks");
    }
    let verdict = if ck.fails.is_empty() {
        "PASS\n".to_string()
    } else {
        ck.fails.iter().map(|f| format!("FAIL: {f}\n")).collect()
    };
    log(&format!("{} wait rounds; verdict:\n{verdict}", rounds));
    if let Err(e) = write_atomic(&args.verdict, verdict.as_bytes()) {
        log(&format!("cannot write verdict: {e}"));
        std::process::exit(2);
    }
    std::process::exit(if ck.fails.is_empty() { 0 } else { 1 });
}
