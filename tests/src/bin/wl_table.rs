//! Processes sharing one descriptor table (clone CLONE_FILES), which a
//! restore must keep shared.
//!
//! `wl_table --ready FILE --verdict FILE --tmp DIR [--unshared-middle 1]`
//!
//! The parent P opens DIR/data (fd X) and puts bytes in a pipe, then makes
//! a child C sharing its table, which makes G sharing it too, and a plain
//! child S with a copy. On SIGTERM the parent checks, through kcmp
//! KCMP_FILES, that P, C and G have one table and S its own; asks G to
//! open DIR/after and reads it through the number G got; asks C to close
//! X and finds X closed; asks S whether it has G's new number (it must
//! not) and X (it must); reads the pipe's bytes back; and finds that an
//! epoll made in the shared table still watches its eventfd.
//!
//! With `--unshared-middle`, C leaves the table after making G (unshare
//! CLONE_FILES): P and G share one that C does not, which cryo refuses;
//! the checks are P's and G's only.

use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_table";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// An eventfd and an epoll watching it (EPOLLIN, data 0xfeed).
fn epoll_of_eventfd() -> Result<(i32, i32), String> {
    // SAFETY: eventfd and epoll calls with plain values and a local event.
    unsafe {
        let ev = libc::eventfd(0, libc::EFD_CLOEXEC);
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        let mut e = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0xfeed,
        };
        if ev < 0 || ep < 0 || libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, ev, &mut e) != 0 {
            return Err(os_err("eventfd/epoll"));
        }
        Ok((ep, ev))
    }
}

fn is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD takes an integer only.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn same_table(a: i32, b: i32) -> bool {
    const KCMP_FILES: i32 = 2;
    // SAFETY: plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_kcmp, a, b, KCMP_FILES, 0, 0) == 0 }
}

/// A child's loop: one command byte after another from `cmd`, answered
/// on `back`, until 'x'.
fn serve(cmd: i32, back: i32, tmp: &Path) -> ! {
    loop {
        let mut c = [0u8; 1];
        if !wl::read_exact(cmd, &mut c) {
            break;
        }
        match c[0] {
            b'o' => {
                let path = CString::new(tmp.join("after").to_str().unwrap_or_default())
                    .unwrap_or_default();
                // SAFETY: opens a NUL-terminated path of ours.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
                wl::write_fd(back, &fd.to_le_bytes());
            }
            b'c' => {
                let mut n = [0u8; 4];
                let ok = wl::read_exact(cmd, &mut n)
                    // SAFETY: closes a number of the shared table, on request.
                    && unsafe { libc::close(i32::from_le_bytes(n)) } == 0;
                wl::write_fd(back, if ok { b"k" } else { b"n" });
            }
            b'q' => {
                let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
                let _ = wl::read_exact(cmd, &mut a) && wl::read_exact(cmd, &mut b);
                let has = |n: [u8; 4]| {
                    if is_open(i32::from_le_bytes(n)) {
                        b'y'
                    } else {
                        b'n'
                    }
                };
                wl::write_fd(back, &[has(a), has(b)]);
            }
            _ => break,
        }
    }
    // SAFETY: ends the child at once.
    unsafe { libc::_exit(0) }
}

struct Kids {
    c: (i32, i32),
    g: (i32, i32),
    s: (i32, i32),
}

fn make_kids(tmp: &Path, back: i32, unshared_middle: bool) -> Result<Kids, String> {
    let (to_c, to_g, to_s) = (wl::pipe()?, wl::pipe()?, wl::pipe()?);
    // G's pid comes back from C through this pipe.
    let gpid = wl::pipe()?;
    let c = wl::clone_sharing(libc::CLONE_FILES as u64)?;
    if c == 0 {
        let g = match wl::clone_sharing(libc::CLONE_FILES as u64) {
            Ok(0) => serve(to_g[0], back, tmp),
            Ok(g) => g,
            Err(_) => -1,
        };
        // SAFETY: unshare takes a flag only; this process leaves the table.
        if unshared_middle && unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(1) };
        }
        wl::write_fd(gpid[1], &g.to_le_bytes());
        serve(to_c[0], back, tmp)
    }
    let mut g = [0u8; 4];
    if !wl::read_exact(gpid[0], &mut g) || i32::from_le_bytes(g) <= 0 {
        return Err("the grandchild was not made".into());
    }
    // SAFETY: fork of this single-threaded process; the child only serves.
    let s = unsafe { libc::fork() };
    if s == 0 {
        serve(to_s[0], back, tmp)
    }
    if s < 0 {
        return Err(os_err("fork"));
    }
    Ok(Kids {
        c: (c, to_c[1]),
        g: (i32::from_le_bytes(g), to_g[1]),
        s: (s, to_s[1]),
    })
}

fn run(a: &wl::Args, tmp: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let unshared_middle = a.get("unshared-middle") == Some("1");
    std::fs::write(tmp.join("data"), b"before").map_err(|e| format!("data: {e}"))?;
    std::fs::write(tmp.join("after"), b"after-data").map_err(|e| format!("after: {e}"))?;
    let data = std::fs::File::open(tmp.join("data")).map_err(|e| format!("data: {e}"))?;
    let x = std::os::fd::IntoRawFd::into_raw_fd(data);
    let flight = wl::pipe()?;
    wl::write_fd(flight[1], b"inflight");
    let back = wl::pipe()?;
    let kids = make_kids(tmp, back[1], unshared_middle)?;
    // In the shared table, not in the forked child's copy.
    let (ep, ev) = epoll_of_eventfd()?;
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let me = std::process::id() as i32;
    let mut fails = Vec::new();
    let middle_shares = !unshared_middle;
    if same_table(me, kids.c.0) != middle_shares {
        fails.push(format!(
            "kcmp: the child shares the table: {}",
            !middle_shares
        ));
    }
    if !same_table(me, kids.g.0) {
        fails.push("kcmp: the grandchild does not share the table".into());
    }
    if same_table(me, kids.s.0) {
        fails.push("kcmp: the forked child shares the table".into());
    }
    // G opens a file: its number is ours.
    wl::write_fd(kids.g.1, b"o");
    let mut n = [0u8; 4];
    let opened = if wl::read_exact(back[0], &mut n) {
        i32::from_le_bytes(n)
    } else {
        -1
    };
    let mut buf = [0u8; 16];
    // SAFETY: reads into a local buffer from a number the grandchild gave.
    let got = unsafe { libc::pread(opened, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got != 10 || &buf[..10] != b"after-data" {
        fails.push(format!(
            "the grandchild opened fd {opened}; here it reads {got} bytes"
        ));
    }
    if middle_shares {
        // C closes X: it is gone here.
        wl::write_fd(kids.c.1, b"c");
        wl::write_fd(kids.c.1, &x.to_le_bytes());
        let mut k = [0u8; 1];
        if !wl::read_exact(back[0], &mut k) || k[0] != b'k' || is_open(x) {
            fails.push(format!(
                "the child closed fd {x}; here it is open: {}",
                is_open(x)
            ));
        }
    }
    // S has a copy: neither change is its.
    wl::write_fd(kids.s.1, b"q");
    wl::write_fd(kids.s.1, &opened.to_le_bytes());
    wl::write_fd(kids.s.1, &x.to_le_bytes());
    let mut has = [0u8; 2];
    if !wl::read_exact(back[0], &mut has) || has != *b"ny" {
        fails.push(format!(
            "the forked child has fd {opened} / fd {x}: {:?} (want n, y)",
            String::from_utf8_lossy(&has)
        ));
    }
    // The epoll, in every sharer's table, still watches the eventfd.
    wl::write_fd(ev, &1u64.to_ne_bytes());
    let mut e = [libc::epoll_event { events: 0, u64: 0 }];
    // SAFETY: epoll_wait into a local array of one.
    let n = unsafe { libc::epoll_wait(ep, e.as_mut_ptr(), 1, 1000) };
    let data = e[0].u64;
    if n != 1 || data != 0xfeed {
        fails.push(format!(
            "the shared epoll reported {n} events, data {data:#x}"
        ));
    }
    let mut inflight = [0u8; 8];
    if !wl::read_exact(flight[0], &mut inflight) || &inflight != b"inflight" {
        fails.push("the pipe's bytes are not back".into());
    }
    for (pid, cmd) in [kids.c, kids.g, kids.s] {
        wl::write_fd(cmd, b"x");
        if pid == kids.g.0 {
            continue; // C's child
        }
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_table --ready FILE --verdict FILE --tmp DIR [--unshared-middle 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let tmp = a.tmp_dir(NAME, usage);
    let result = run(&a, &tmp);
    wl::finish(NAME, &a.verdict, result);
}
