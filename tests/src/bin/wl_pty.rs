//! A pseudo-terminal pair inside the tree, with a session on it.
//!
//! `wl_pty --ready FILE --verdict FILE`
//! `wl_pty --ready FILE --verdict FILE --hold-slave PATH`
//! `wl_pty --ready FILE --verdict FILE --hold-master FILE`
//!
//! The parent opens a pty (/dev/ptmx, grantpt, unlockpt), puts the slave
//! side in raw mode with VMIN 5, VTIME 3, VINTR ^G and 9600 baud, sets the
//! window to 37 rows by 101 columns (640x480 pixels) and the master to
//! packet mode; it also opens a second pty that it leaves locked, whose
//! slave node it gives owner 4321:8765 and mode 0640. The
//! child makes its own session with the slave as its controlling terminal
//! (on fds 0 and 20, one open file description, O_NONBLOCK), forks a
//! grandchild that leads its own process group, and makes that group the
//! terminal's foreground; another child of it, in its group, gave the
//! terminal up (TIOCNOTTY) before the grandchild was made and must not
//! have it after the restore. Only the parent holds the masters. Nothing
//! is in flight when it says it is ready.
//!
//! On SIGTERM the parent checks the names (ptsname), settings, size,
//! packet mode and locks of both masters, and that the locked pty's slave
//! cannot be opened; the child checks its descriptors name the same slave,
//! the settings and size seen from the slave, that it leads its session
//! (getsid, tcgetsid), that the terminal is its controlling one (/dev/tty
//! opens and is that device, /proc/self/stat tty_nr) and that the
//! grandchild's group is the foreground; the grandchild checks its
//! controlling terminal and that it is in the foreground, then data flows
//! both ways: the parent writes every byte value to the master, the
//! grandchild must read exactly those from the slave and writes them back
//! reversed, which the parent must read (as packet-mode data) from the
//! master. The child collects the grandchild's verdict, the parent the
//! child's.
//!
//! With `--hold-slave PATH` it only holds PATH (the slave of a pty whose
//! master its starter holds) on fd 5; with `--hold-master FILE` it holds
//! the master of a new pty on fd 5 and writes the slave's path to FILE. On
//! SIGTERM each checks that its descriptor is still that terminal.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cryo_tests::wl;

const NAME: &str = "wl_pty";
/// The second number of the child's slave (fd 0 is the first).
const SLAVE_FD: i32 = 20;
/// Where the refusal modes keep their terminal.
const HELD_FD: i32 = 5;
const ROWS: u16 = 37;
const COLS: u16 = 101;

fn last() -> String {
    std::io::Error::last_os_error().to_string()
}

fn wait_term() {
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn cpath(p: &str) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(p).map_err(|_| format!("NUL in {p:?}"))
}

fn open(path: &str, flags: i32) -> Result<i32, String> {
    let c = cpath(path)?;
    // SAFETY: a NUL-terminated path we own.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path}: {}", last()));
    }
    Ok(fd)
}

/// The owner and mode the locked pty's slave node is given.
const SLAVE_OWNER: (u32, u32) = (4321, 8765);
const SLAVE_MODE: u32 = 0o640;

/// A new master, grantpt'd, unlocked if asked.
fn open_master(unlock: bool) -> Result<i32, String> {
    let m = open("/dev/ptmx", libc::O_RDWR | libc::O_NOCTTY)?;
    // SAFETY: grantpt/unlockpt on our own master.
    if unsafe { libc::grantpt(m) } != 0 || (unlock && unsafe { libc::unlockpt(m) } != 0) {
        return Err(format!("grantpt/unlockpt: {}", last()));
    }
    Ok(m)
}

/// The slave path of a master (ptsname_r).
fn ptsname(m: i32) -> Result<String, String> {
    let mut buf = [0 as libc::c_char; 64];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most buf.len()
    // bytes into our buffer.
    if unsafe { libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) } != 0 {
        return Err(format!("ptsname of fd {m}: {}", last()));
    }
    // SAFETY: ptsname_r succeeded, so buf holds a NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(s.to_string_lossy().into_owned())
}

fn link(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn rdev(fd: i32) -> u64 {
    // SAFETY: struct stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of our own descriptor into a local.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return 0;
    }
    st.st_rdev
}

/// A device number as the kernel shows a terminal in /proc/PID/stat and
/// TIOCGDEV (new_encode_dev).
fn tty_nr(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Fields of /proc/self/stat after the command: state is 0, tty_nr 4,
/// tpgid 5.
fn stat_field(i: usize) -> Option<i64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(i)?.parse().ok()
}

fn get_termios(fd: i32) -> Result<libc::termios, String> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr on our descriptor into a local.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(format!("tcgetattr fd {fd}: {}", last()));
    }
    Ok(t)
}

/// The fields the kernel keeps (the first 19 control characters).
fn termios_key(t: &libc::termios) -> (u32, u32, u32, u32, u8, Vec<u8>, u32, u32) {
    // SAFETY: cfget*speed only read the struct.
    let (i, o) = unsafe { (libc::cfgetispeed(t), libc::cfgetospeed(t)) };
    (
        t.c_iflag,
        t.c_oflag,
        t.c_cflag,
        t.c_lflag,
        t.c_line,
        t.c_cc[..19].to_vec(),
        i,
        o,
    )
}

fn get_winsize(fd: i32) -> Result<libc::winsize, String> {
    let mut w = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a struct winsize into our local.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) } != 0 {
        return Err(format!("TIOCGWINSZ fd {fd}: {}", last()));
    }
    Ok(w)
}

fn winsize_key(w: &libc::winsize) -> (u16, u16, u16, u16) {
    (w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel)
}

/// An int-valued query ioctl (TIOCGPKT, TIOCGPTLCK, TIOCGDEV).
fn get_int(fd: i32, req: libc::Ioctl) -> Result<i32, String> {
    let mut v: libc::c_int = -1;
    // SAFETY: the requests used here write one int into our local.
    if unsafe { libc::ioctl(fd, req, &mut v) } != 0 {
        return Err(last());
    }
    Ok(v)
}

fn write_all(fd: i32, data: &[u8]) -> Result<(), String> {
    let mut off = 0;
    let start = Instant::now();
    while off < data.len() {
        // SAFETY: writing from the unwritten tail of our buffer.
        let n = unsafe { libc::write(fd, data[off..].as_ptr().cast(), data.len() - off) };
        if n > 0 {
            off += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if n < 0 && e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed().as_secs() < 10 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if n < 0 && e.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return Err(format!("write fd {fd}: {e}"));
    }
    Ok(())
}

/// Read `want` bytes within 10 s (poll, then read). A packet-mode master
/// gives a status byte before each read's data: 0 (TIOCPKT_DATA) is
/// dropped, any other is a status report and is counted in `status`.
fn read_exact(fd: i32, want: usize, packet: bool, status: &mut usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < want {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "read {} of {want} bytes from fd {fd} in 10 s",
                out.len()
            ));
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let r = unsafe { libc::poll(&mut p, 1, 100) };
        if r <= 0 {
            continue;
        }
        let mut buf = [0u8; 1024];
        // SAFETY: reading into our local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(format!("read fd {fd}: {e}"));
        }
        if n == 0 {
            return Err(format!("end of file on fd {fd} after {} bytes", out.len()));
        }
        let got = &buf[..n as usize];
        if packet {
            match got[0] {
                0 => out.extend_from_slice(&got[1..]),
                _ => *status += 1,
            }
        } else {
            out.extend_from_slice(got);
        }
    }
    Ok(out)
}

fn ping() -> Vec<u8> {
    (0..=255u8).collect()
}

fn pong() -> Vec<u8> {
    let mut v = ping();
    v.reverse();
    v
}

/// The pty as it was set up, for every process's checks.
struct Expect {
    path: String,
    rdev: u64,
    termios: (u32, u32, u32, u32, u8, Vec<u8>, u32, u32),
    winsize: (u16, u16, u16, u16),
}

/// What the child and grandchild check about their controlling terminal.
fn ctty_checks(who: &str, e: &Expect, sid: i32, fails: &mut Vec<String>) {
    if link(0) != e.path {
        fails.push(format!("{who}: fd 0 is {:?}, was {}", link(0), e.path));
    }
    if rdev(0) != e.rdev {
        fails.push(format!(
            "{who}: fd 0 is device {:#x}, was {:#x}",
            rdev(0),
            e.rdev
        ));
    }
    let want_nr = tty_nr(e.rdev) as i64;
    if stat_field(4) != Some(want_nr) {
        fails.push(format!(
            "{who}: /proc/self/stat tty_nr is {:?}, expected {want_nr:#x} ({})",
            stat_field(4),
            e.path
        ));
    }
    // SAFETY: getsid of this process.
    let my_sid = unsafe { libc::getsid(0) };
    if my_sid != sid {
        fails.push(format!("{who}: in session {my_sid}, was {sid}"));
    }
    // SAFETY: tcgetsid on our own descriptor.
    let tsid = unsafe { libc::tcgetsid(0) };
    if tsid != sid {
        fails.push(format!(
            "{who}: the terminal's session is {tsid} ({}), expected {sid}",
            last()
        ));
    }
    match open("/dev/tty", libc::O_RDWR | libc::O_NOCTTY) {
        Ok(fd) => {
            match get_int(fd, libc::TIOCGDEV) {
                Ok(dev) if dev as u32 == tty_nr(e.rdev) => {}
                Ok(dev) => fails.push(format!(
                    "{who}: /dev/tty is device {dev:#x}, not {} ({:#x})",
                    e.path,
                    tty_nr(e.rdev)
                )),
                Err(err) => fails.push(format!("{who}: TIOCGDEV on /dev/tty: {err}")),
            }
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(fd) };
        }
        Err(err) => fails.push(format!("{who}: no controlling terminal: {err}")),
    }
}

fn grandchild(e: &Expect, sid: i32, verdict: &Path) -> ! {
    wait_term();
    let mut fails = Vec::new();
    ctty_checks("grandchild", e, sid, &mut fails);
    // SAFETY: getpgrp and tcgetpgrp of this process and its descriptor.
    let (pgrp, fg) = unsafe { (libc::getpgrp(), libc::tcgetpgrp(0)) };
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    if pgrp != me {
        fails.push(format!("grandchild: in group {pgrp}, not its own {me}"));
    }
    if fg != me {
        fails.push(format!(
            "grandchild: the foreground group is {fg}, not its own {me}"
        ));
    }
    // Exactly what the parent wrote into the master, then the answer.
    let mut status = 0;
    match read_exact(0, 256, false, &mut status) {
        Ok(got) if got == ping() => {
            if let Err(err) = write_all(0, &pong()) {
                fails.push(format!("grandchild: {err}"));
            }
        }
        Ok(got) => fails.push(format!(
            "grandchild: read {} other bytes from the slave: {:?}",
            got.len(),
            &got[..got.len().min(32)]
        )),
        Err(err) => fails.push(format!("grandchild: {err}")),
    }
    let _ = wl::write_atomic(verdict, verdict_text(&fails).as_bytes());
    // Let the parent read the answer before the slave closes.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: _exit without the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}

fn verdict_text(fails: &[String]) -> String {
    if fails.is_empty() {
        "PASS\n".into()
    } else {
        fails.iter().map(|l| format!("FAIL: {l}\n")).collect()
    }
}

fn fails_of(path: &Path, who: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|_| format!("FAIL: {who} wrote no verdict\n"))
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL: "))
        .map(String::from)
        .collect()
}

/// The session leader: slave on fds 0 and 20, the grandchild's group in
/// the foreground. Tells the parent through `ready_w` once all is set.
fn child(e: &Expect, ready_w: i32, verdict: &Path) -> Result<Vec<String>, String> {
    // SAFETY: setsid has no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(format!("setsid: {}", last()));
    }
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    // Without O_NOCTTY: the session leader's first terminal; TIOCSCTTY
    // says so explicitly.
    let s = open(&e.path, libc::O_RDWR)?;
    // SAFETY: TIOCSCTTY with an integer argument on our descriptor;
    // dup3 onto fixed numbers.
    unsafe {
        if libc::ioctl(s, libc::TIOCSCTTY, 0) != 0 {
            return Err(format!("TIOCSCTTY: {}", last()));
        }
        if libc::dup3(s, 0, 0) < 0 || libc::dup3(s, SLAVE_FD, libc::O_CLOEXEC) < 0 {
            return Err(format!("dup3: {}", last()));
        }
        libc::close(s);
        libc::fcntl(0, libc::F_SETFL, libc::O_NONBLOCK | libc::O_RDWR);
    }
    // The one that gave its terminal up first: the grandchild inherits
    // it from this process.
    let n_verdict = verdict.with_extension("notty");
    let n = fork_ready(
        || {
            let fd = open("/dev/tty", libc::O_RDWR | libc::O_NOCTTY)?;
            // SAFETY: TIOCNOTTY (no argument) on a new descriptor of our
            // controlling terminal, closed right after.
            let r = unsafe {
                let r = match libc::ioctl(fd, libc::TIOCNOTTY, 0) {
                    0 => Ok(()),
                    _ => Err(format!("TIOCNOTTY: {}", last())),
                };
                libc::close(fd);
                r
            };
            r
        },
        || notty(e, me, &n_verdict),
    )?;
    let g_verdict = verdict.with_extension("grandchild");
    let g = fork_ready(
        || {
            // SAFETY: setpgid of this process; the SIGTTIN disposition of
            // this process (a read from the background fails with EIO
            // instead of stopping it).
            unsafe {
                libc::setpgid(0, 0);
                libc::signal(libc::SIGTTIN, libc::SIG_IGN);
            }
            Ok(())
        },
        || grandchild(e, me, &g_verdict),
    )?;
    // SAFETY: setpgid of our child (done by both, to be sure it is done).
    unsafe { libc::setpgid(g, g) };
    // SAFETY: tcsetpgrp on our controlling terminal; we are in its
    // foreground group until this call.
    if unsafe { libc::tcsetpgrp(0, g) } != 0 {
        return Err(format!("tcsetpgrp: {}", last()));
    }
    // SAFETY: one byte to the parent, then our end is closed.
    unsafe {
        libc::write(ready_w, b"r".as_ptr().cast(), 1);
        libc::close(ready_w);
    }
    wait_term();
    let mut fails = Vec::new();
    ctty_checks("child", e, me, &mut fails);
    if link(SLAVE_FD) != e.path {
        fails.push(format!(
            "child: fd {SLAVE_FD} is {:?}, was {}",
            link(SLAVE_FD),
            e.path
        ));
    }
    // SAFETY: kcmp on two descriptors of this process.
    let same = unsafe {
        libc::syscall(libc::SYS_kcmp, me, me, 0 /* KCMP_FILE */, 0, SLAVE_FD)
    };
    if same != 0 {
        fails.push(format!(
            "child: fds 0 and {SLAVE_FD} are not one open file description any more"
        ));
    }
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(0, libc::F_GETFL) } & libc::O_NONBLOCK == 0 {
        fails.push("child: the slave lost O_NONBLOCK".into());
    }
    match get_termios(0) {
        Ok(t) if termios_key(&t) == e.termios => {}
        Ok(t) => fails.push(format!(
            "child: the slave's settings are {:?}, were {:?}",
            termios_key(&t),
            e.termios
        )),
        Err(err) => fails.push(format!("child: {err}")),
    }
    match get_winsize(0) {
        Ok(w) if winsize_key(&w) == e.winsize => {}
        Ok(w) => fails.push(format!(
            "child: the window is {:?}, was {:?}",
            winsize_key(&w),
            e.winsize
        )),
        Err(err) => fails.push(format!("child: {err}")),
    }
    // SAFETY: tcgetpgrp on our descriptor.
    let fg = unsafe { libc::tcgetpgrp(0) };
    if fg != g {
        fails.push(format!(
            "child: the foreground group is {fg}, not the grandchild's {g}"
        ));
    }
    for (pid, v, who) in [
        (g, &g_verdict, "the grandchild"),
        (n, &n_verdict, "the child that gave up its terminal"),
    ] {
        // SAFETY: SIGTERM to our own child, then waiting for it.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        fails.extend(fails_of(v, who));
    }
    Ok(fails)
}

/// Fork a child that runs `setup`, tells us it is done (or failed, as its
/// verdict would say), then `body`. Returns its pid once its setup is done.
fn fork_ready(
    setup: impl FnOnce() -> Result<(), String>,
    body: impl FnOnce(),
) -> Result<i32, String> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", last()));
    }
    // SAFETY: single-threaded; the child runs this program's code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let r = setup();
        let b: &[u8] = if r.is_ok() { b"y" } else { b"n" };
        if let Err(err) = r {
            wl::log(NAME, &format!("setup: {err}"));
        }
        // SAFETY: one byte to the parent on our pipe, closing both ends.
        unsafe {
            libc::close(p[0]);
            libc::write(p[1], b.as_ptr().cast(), 1);
            libc::close(p[1]);
        }
        body();
        // SAFETY: _exit without the parent's atexit handlers (the bodies
        // end with their own _exit).
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        return Err(format!("fork: {}", last()));
    }
    let mut b = [0u8; 1];
    // SAFETY: closing our copy of the write end; reading one byte into a
    // local; closing the read end.
    let n = unsafe {
        libc::close(p[1]);
        let n = libc::read(p[0], b.as_mut_ptr().cast(), 1);
        libc::close(p[0]);
        n
    };
    if n != 1 || b[0] != b'y' {
        return Err(format!("child {pid} failed its setup (see the log)"));
    }
    Ok(pid)
}

/// A member of the session that gave up its controlling terminal
/// (TIOCNOTTY) but keeps the slave open on fd 0.
fn notty(e: &Expect, sid: i32, verdict: &Path) -> ! {
    wait_term();
    let mut fails = Vec::new();
    if link(0) != e.path {
        fails.push(format!("notty: fd 0 is {:?}, was {}", link(0), e.path));
    }
    match open("/dev/tty", libc::O_RDWR | libc::O_NOCTTY) {
        Err(err) if err.contains("No such device or address") => {}
        Err(err) => fails.push(format!("notty: opening /dev/tty failed otherwise: {err}")),
        Ok(fd) => {
            fails.push("notty: has a controlling terminal again".into());
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(fd) };
        }
    }
    if stat_field(4) != Some(0) {
        fails.push(format!(
            "notty: /proc/self/stat tty_nr is {:?}, expected 0",
            stat_field(4)
        ));
    }
    // SAFETY: getsid of this process.
    let my_sid = unsafe { libc::getsid(0) };
    if my_sid != sid {
        fails.push(format!("notty: in session {my_sid}, was {sid}"));
    }
    let _ = wl::write_atomic(verdict, verdict_text(&fails).as_bytes());
    // SAFETY: _exit without the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}

fn run(ready: &Path, verdict: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let m = open_master(true)?;
    let path = ptsname(m)?;
    let mut t = get_termios(m)?;
    // SAFETY: cfmakeraw and cfset*speed only change our local struct.
    unsafe {
        libc::cfmakeraw(&mut t);
        libc::cfsetispeed(&mut t, libc::B9600);
        libc::cfsetospeed(&mut t, libc::B9600);
    }
    t.c_cc[libc::VMIN] = 5;
    t.c_cc[libc::VTIME] = 3;
    t.c_cc[libc::VINTR] = 0x07;
    // SAFETY: tcsetattr on our master (the slave's settings).
    if unsafe { libc::tcsetattr(m, libc::TCSANOW, &t) } != 0 {
        return Err(format!("tcsetattr: {}", last()));
    }
    let ws = libc::winsize {
        ws_row: ROWS,
        ws_col: COLS,
        ws_xpixel: 640,
        ws_ypixel: 480,
    };
    // SAFETY: TIOCSWINSZ reads a struct winsize we own; TIOCPKT an int.
    unsafe {
        if libc::ioctl(m, libc::TIOCSWINSZ, &ws) != 0 {
            return Err(format!("TIOCSWINSZ: {}", last()));
        }
        let on: libc::c_int = 1;
        if libc::ioctl(m, libc::TIOCPKT, &on) != 0 {
            return Err(format!("TIOCPKT: {}", last()));
        }
    }
    let locked = open_master(false)?;
    let locked_path = ptsname(locked)?;
    // The locked pty's slave node gets an owner and mode of its own.
    std::os::unix::fs::chown(&locked_path, Some(SLAVE_OWNER.0), Some(SLAVE_OWNER.1))
        .map_err(|e| format!("chown {locked_path}: {e}"))?;
    std::fs::set_permissions(
        &locked_path,
        std::os::unix::fs::PermissionsExt::from_mode(SLAVE_MODE),
    )
    .map_err(|e| format!("chmod {locked_path}: {e}"))?;
    // The slave's device number, from a short-lived open of it.
    let s = open(&path, libc::O_RDWR | libc::O_NOCTTY)?;
    let e = Expect {
        path: path.clone(),
        rdev: rdev(s),
        termios: termios_key(&get_termios(m)?),
        winsize: winsize_key(&get_winsize(m)?),
    };
    // SAFETY: closing the descriptor just opened.
    unsafe { libc::close(s) };
    wl::log(
        NAME,
        &format!(
            "pty {path} (and {locked_path}, locked); settings {:?}",
            e.termios
        ),
    );
    let mut rp = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `rp`.
    if unsafe { libc::pipe2(rp.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", last()));
    }
    let kid_verdict = verdict.with_extension("child");
    // SAFETY: single-threaded; the child runs this program's own code.
    let kid = unsafe { libc::fork() };
    if kid == 0 {
        // Only the parent holds the masters.
        // SAFETY: closing descriptors of this process.
        unsafe {
            libc::close(m);
            libc::close(locked);
            libc::close(rp[0]);
        }
        let fails = match child(&e, rp[1], &kid_verdict) {
            Ok(f) => f,
            Err(err) => vec![format!("child setup: {err}")],
        };
        let _ = wl::write_atomic(&kid_verdict, verdict_text(&fails).as_bytes());
        // SAFETY: _exit without the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    if kid < 0 {
        return Err(format!("fork: {}", last()));
    }
    let mut b = [0u8; 1];
    // SAFETY: closing our copy of the write end; reading one byte.
    let n = unsafe {
        libc::close(rp[1]);
        libc::read(rp[0], b.as_mut_ptr().cast(), 1)
    };
    // SAFETY: closing the read end, done with.
    unsafe { libc::close(rp[0]) };
    if n != 1 {
        return Err(format!(
            "the child did not finish its setup: {}",
            std::fs::read_to_string(&kid_verdict).unwrap_or_default()
        ));
    }
    wl::write_atomic(ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    wait_term();
    let mut fails = Vec::new();
    for (fd, want) in [(m, &path), (locked, &locked_path)] {
        match ptsname(fd) {
            Ok(p) if p == *want => {}
            Ok(p) => fails.push(format!("parent: master fd {fd} is pty {p}, was {want}")),
            Err(err) => fails.push(format!("parent: {err}")),
        }
    }
    match get_termios(m) {
        Ok(t) if termios_key(&t) == e.termios => {}
        Ok(t) => fails.push(format!(
            "parent: the settings are {:?} through the master, were {:?}",
            termios_key(&t),
            e.termios
        )),
        Err(err) => fails.push(format!("parent: {err}")),
    }
    match get_winsize(m) {
        Ok(w) if winsize_key(&w) == e.winsize => {}
        Ok(w) => fails.push(format!(
            "parent: the window is {:?}, was {:?}",
            winsize_key(&w),
            e.winsize
        )),
        Err(err) => fails.push(format!("parent: {err}")),
    }
    for (fd, req, name, want) in [
        (m, libc::TIOCGPKT, "packet mode", 1),
        (m, libc::TIOCGPTLCK, "the lock", 0),
        (locked, libc::TIOCGPTLCK, "the lock of the locked pty", 1),
        (locked, libc::TIOCGPKT, "packet mode of the locked pty", 0),
    ] {
        match get_int(fd, req) {
            Ok(v) if (v != 0) == (want != 0) => {}
            Ok(v) => fails.push(format!("parent: {name} is {v}, was {want}")),
            Err(err) => fails.push(format!("parent: reading {name}: {err}")),
        }
    }
    match std::fs::metadata(&locked_path) {
        Ok(md) => {
            use std::os::unix::fs::MetadataExt;
            let got = (md.uid(), md.gid(), md.mode() & 0o7777);
            let want = (SLAVE_OWNER.0, SLAVE_OWNER.1, SLAVE_MODE);
            if got != want {
                fails.push(format!(
                    "parent: {locked_path} is owned by {}:{} with mode {:o}, expected {}:{} {:o}",
                    got.0, got.1, got.2, want.0, want.1, want.2
                ));
            }
        }
        Err(e) => fails.push(format!("parent: stat {locked_path}: {e}")),
    }
    match open(&locked_path, libc::O_RDWR | libc::O_NOCTTY) {
        Err(err) if err.contains("Input/output error") => {}
        Err(err) => fails.push(format!(
            "parent: opening the locked pty's slave failed otherwise: {err}"
        )),
        Ok(fd) => {
            fails.push(format!(
                "parent: the locked pty's slave {locked_path} opens"
            ));
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(kid, libc::SIGTERM) };
    // Data both ways: the grandchild answers once the child let it check.
    if let Err(err) = write_all(m, &ping()) {
        fails.push(format!("parent: {err}"));
    }
    let mut status = 0;
    match read_exact(m, 256, true, &mut status) {
        Ok(got) if got == pong() => {}
        Ok(got) => fails.push(format!(
            "parent: read {} other bytes from the master: {:?}",
            got.len(),
            &got[..got.len().min(32)]
        )),
        Err(err) => fails.push(format!("parent: {err}")),
    }
    if status > 0 {
        wl::log(NAME, &format!("{status} packet-mode status reports"));
    }
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(kid, std::ptr::null_mut(), 0) };
    fails.extend(fails_of(&kid_verdict, "the child"));
    Ok(fails)
}

/// `--hold-slave PATH` and `--hold-master FILE`: one terminal on fd 5.
fn hold(
    ready: &Path,
    slave: Option<&str>,
    master_file: Option<&str>,
) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let (fd, name) = match (slave, master_file) {
        (Some(p), _) => (open(p, libc::O_RDWR | libc::O_NOCTTY)?, p.to_string()),
        (None, Some(f)) => {
            let m = open_master(true)?;
            let p = ptsname(m)?;
            std::fs::write(f, &p).map_err(|e| format!("writing {f}: {e}"))?;
            (m, "/dev/ptmx".to_string())
        }
        (None, None) => return Err("nothing to hold".into()),
    };
    // SAFETY: dup3 onto a fixed number, then closing the original.
    unsafe {
        if libc::dup3(fd, HELD_FD, libc::O_CLOEXEC) < 0 {
            return Err(format!("dup3: {}", last()));
        }
        libc::close(fd);
    }
    let before = master_file.map(|_| ptsname(HELD_FD)).transpose()?;
    wl::write_atomic(ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    wait_term();
    let mut fails = Vec::new();
    if link(HELD_FD) != name {
        fails.push(format!("fd {HELD_FD} is {:?}, was {name}", link(HELD_FD)));
    }
    // SAFETY: isatty on our own descriptor.
    if unsafe { libc::isatty(HELD_FD) } != 1 {
        fails.push(format!("fd {HELD_FD} is not a terminal any more"));
    }
    if let Some(b) = before {
        let now = ptsname(HELD_FD).unwrap_or_default();
        if now != b {
            fails.push(format!("the master is pty {now:?}, was {b}"));
        }
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_pty --ready FILE --verdict FILE [--hold-slave PATH | --hold-master FILE]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = if a.get("hold-slave").is_some() || a.get("hold-master").is_some() {
        hold(&a.ready, a.get("hold-slave"), a.get("hold-master"))
    } else {
        run(&a.ready, &a.verdict)
    };
    wl::finish(NAME, &a.verdict, result);
}
