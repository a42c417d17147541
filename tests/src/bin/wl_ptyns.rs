//! A process with a devpts instance of its own in its own mount namespace
//! and a pty pair of it, next to a pty of the host's devpts: a restore
//! must mount the instance anew and make the pair again there, with its
//! index, settings and window size, without mixing up the two index
//! spaces.
//!
//! `wl_ptyns --ready FILE --verdict FILE`
//!
//! The process opens a pty of the host's devpts (/dev/ptmx), unshares
//! its mount namespace (every mount private), mounts a new devpts
//! instance on /dev/pts and opens a pair of it through /dev/pts/ptmx
//! (index 0 there), with a window size of 33x77; echo is off on both. On SIGTERM it checks both pairs: their indexes, that
//! the container slave is /dev/pts/0 of its own instance (not the
//! host's), the window size and echo setting, and that bytes go both
//! ways through each pair.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_ptyns";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn open(path: &str, flags: i32) -> Result<OwnedFd, String> {
    let c = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: a live NUL-terminated path; the descriptor is owned at once.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(os_err(&format!("open {path}")));
    }
    // SAFETY: `fd` was just returned and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pair through the ptmx at `ptmx`: master, slave, index.
fn pair(ptmx: &str, pts: &str) -> Result<(OwnedFd, OwnedFd, u32), String> {
    let m = open(ptmx, libc::O_RDWR)?;
    let mut n: libc::c_uint = 0;
    let mut unlock: libc::c_int = 0;
    // SAFETY: TIOCGPTN and TIOCSPTLCK read or write one int.
    unsafe {
        if libc::ioctl(m.as_raw_fd(), libc::TIOCGPTN, &mut n) != 0
            || libc::ioctl(m.as_raw_fd(), libc::TIOCSPTLCK, &mut unlock) != 0
        {
            return Err(os_err("TIOCGPTN/TIOCSPTLCK"));
        }
    }
    let s = open(&format!("{pts}/{n}"), libc::O_RDWR)?;
    Ok((m, s, n))
}

fn index(m: &OwnedFd) -> u32 {
    let mut n: libc::c_uint = u32::MAX;
    // SAFETY: TIOCGPTN writes one int.
    unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCGPTN, &mut n) };
    n
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: zeroed is a valid termios, which tcgetattr fills.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into the local struct.
    unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) };
    t
}

/// `data` written on `from` comes out of `to`.
fn flows(from: &OwnedFd, to: &OwnedFd, data: &[u8]) -> bool {
    wl::write_fd(from.as_raw_fd(), data);
    let mut got = vec![0u8; data.len()];
    let mut pfd = libc::pollfd {
        fd: to.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd of ours.
    if unsafe { libc::poll(&mut pfd, 1, 2000) } != 1 {
        return false;
    }
    wl::read_exact(to.as_raw_fd(), &mut got) && got == data
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    // No controlling terminal of the test's (a pty of the host's of the
    // same index as the container's would be refused).
    // SAFETY: setsid takes nothing.
    unsafe { libc::setsid() };
    let (hm, hs, hn) = pair("/dev/ptmx", "/dev/pts")?;
    let mut t = termios(&hs);
    t.c_lflag &= !libc::ECHO;
    // SAFETY: tcsetattr reads the termios.
    if unsafe { libc::tcsetattr(hs.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(os_err("tcsetattr"));
    }
    // SAFETY: unshare and mount take flags and live strings or nulls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(os_err("unshare(CLONE_NEWNS)"));
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(os_err("making / private"));
        }
        let (src, dst, fs, opts) = (
            c"devpts",
            c"/dev/pts",
            c"devpts",
            c"newinstance,ptmxmode=0666,mode=0620",
        );
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fs.as_ptr(),
            0,
            opts.as_ptr().cast(),
        ) != 0
        {
            return Err(os_err("mounting a devpts instance on /dev/pts"));
        }
    }
    let (cm, cs, cn) = pair("/dev/pts/ptmx", "/dev/pts")?;
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 77,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let mut t = termios(&cs);
    t.c_lflag &= !libc::ECHO;
    // SAFETY: TIOCSWINSZ reads one winsize; tcsetattr reads the termios.
    unsafe {
        if libc::ioctl(cm.as_raw_fd(), libc::TIOCSWINSZ, &ws) != 0
            || libc::tcsetattr(cs.as_raw_fd(), libc::TCSANOW, &t) != 0
        {
            return Err(os_err("TIOCSWINSZ/tcsetattr"));
        }
    }
    if cn != 0 {
        return Err(format!("the new instance's first pty is {cn}, not 0"));
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    if index(&hm) != hn || index(&cm) != cn {
        fails.push(format!(
            "indexes {} and {}, were {hn} and {cn}",
            index(&hm),
            index(&cm)
        ));
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", cs.as_raw_fd())).unwrap_or_default();
    if link != std::path::Path::new("/dev/pts/0") {
        fails.push(format!("the container slave is {}", link.display()));
    }
    // Its own instance: /dev/pts/0 here is the container slave itself.
    use std::os::unix::fs::MetadataExt;
    let node = std::fs::metadata("/dev/pts/0").map(|m| (m.dev(), m.rdev()));
    let mine = std::fs::File::from(cs.try_clone().map_err(|e| e.to_string())?)
        .metadata()
        .map(|m| (m.dev(), m.rdev()));
    if node.as_ref().ok() != mine.as_ref().ok() {
        fails.push(format!("/dev/pts/0 is {node:?}, the slave {mine:?}"));
    }
    let mut w: libc::winsize = ws;
    w.ws_row = 0;
    // SAFETY: TIOCGWINSZ writes one winsize.
    unsafe { libc::ioctl(cs.as_raw_fd(), libc::TIOCGWINSZ, &mut w) };
    if (w.ws_row, w.ws_col) != (33, 77) {
        fails.push(format!("window {}x{}, not 33x77", w.ws_row, w.ws_col));
    }
    if termios(&cs).c_lflag & libc::ECHO != 0 {
        fails.push("echo is back on the container pty".into());
    }
    for (what, m, s) in [("host", &hm, &hs), ("container", &cm, &cs)] {
        if !flows(m, s, b"down\n") || !flows(s, m, b"up") {
            fails.push(format!("bytes do not go both ways through the {what} pty"));
        }
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_ptyns --ready FILE --verdict FILE";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
