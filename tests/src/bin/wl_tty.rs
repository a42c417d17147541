//! A shell job: a process whose standard descriptors are its shell's
//! terminal, for `--shell-job` dumps.
//!
//! `wl_tty --ready FILE --verdict FILE`
//!
//! It remembers the name of the terminal on its descriptors 0-2. On
//! SIGTERM it checks that they are still that terminal, that it still has
//! a controlling terminal (/dev/tty opens), and writes `tty-check-ok` to it
//! for whoever holds the other side.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_tty";

fn ttyname(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn run(ready: &std::path::Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let names: Vec<String> = (0..3).map(ttyname).collect();
    // SAFETY: isatty on our own descriptors.
    if (0..3).any(|fd| unsafe { libc::isatty(fd) } != 1) {
        return Err(format!("not started on a terminal: {names:?}"));
    }
    wl::write_atomic(ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    let now: Vec<String> = (0..3).map(ttyname).collect();
    if now != names {
        fails.push(format!("descriptors 0-2 are {now:?}, were {names:?}"));
    }
    // SAFETY: isatty on our own descriptors.
    if (0..3).any(|fd| unsafe { libc::isatty(fd) } != 1) {
        fails.push("descriptors 0-2 are not terminals any more".into());
    }
    // SAFETY: opening our controlling terminal, closed right after.
    let ctty = unsafe { libc::open(c"/dev/tty".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if ctty < 0 {
        fails.push(format!(
            "no controlling terminal: {}",
            std::io::Error::last_os_error()
        ));
    } else {
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(ctty) };
    }
    wl::write_fd(1, b"tty-check-ok\n");
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse("wl_tty --ready FILE --verdict FILE");
    wl::close_extra_fds();
    let result = run(&a.ready);
    wl::finish(NAME, &a.verdict, result);
}
