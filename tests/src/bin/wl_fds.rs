//! Open files that must come back as they were: shared offsets, flags,
//! pipes and a FIFO with bytes in flight, across a parent and its child.
//!
//! `wl_fds --ready FILE --verdict FILE --tmp DIR [--ext-dgram PATH]`
//!
//! With `--ext-dgram PATH` it also connects a datagram socket to PATH (a
//! socket of whoever started it), sends "before" at once and "after" when
//! it checks itself.
//!
//! The parent opens DIR/shared (offset 10) and dups it; the child inherits
//! both, so three descriptors in two processes share one open file
//! description. DIR/append is open O_APPEND, /dev/null and /dev/zero and
//! DIR itself are open too. The child writes 10000 bytes into a pipe whose
//! buffer it made 256 KiB and the parent has not read them; the parent
//! holds a pipe of its own with "in flight" queued (read end O_NONBLOCK)
//! and a FIFO with "fifo data" queued, which the child opened for reading
//! too (its own open file description: the parent writes to it through
//! the FIFO after the restore). On SIGTERM each checks its own
//! descriptors; the child moves the shared offset to 50 and exits; the
//! parent must see 50 through its dup, read the child's 10000 bytes and
//! then end of file (the child's write end was the only one).
//!
//! The parent also holds an eventfd in semaphore mode with count 5, one
//! with a count that needs every hex digit (0x123456789abc: the kernel
//! prints it in hexadecimal), a timerfd 30 s from expiring with a 1.5 s
//! period, one that expired once and was not read, and a signalfd for
//! SIGUSR1, SIGUSR2 and two realtime signals (a mask with high bits) with
//! a SIGUSR1 queued (blocked).
//!
//! Unix sockets: a stream pair between parent and child with bytes queued
//! in both directions, a datagram pair and a seqpacket pair in the parent
//! with messages queued (boundaries must stay; the seqpacket writer has
//! shut down its sending side), listeners bound to a path and to an
//! abstract name that must accept connections after the restore, and an
//! unbound socket.
//!
//! Files without a name: a memfd with contents and seals (offset 3), a
//! file deleted while open (offset 8), and an O_PATH descriptor.
//!
//! An epoll watching its own pipe, the datagram pair (edge-triggered) and
//! the eventfd, each with its own data word, must report all three ready
//! with those words; a pidfd of the child must still name the child.
//!
//! An inotify instance watches DIR (IN_CREATE, watch 1) and DIR/watched
//! (IN_MODIFY, watch 3; watch 2 was removed), and DIR/watched-4 to
//! DIR/watched-17 (watches 4 to 0x11): after the restore, creating a file
//! in DIR and writing DIR/watched and DIR/watched-17 must report those
//! watches.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_fds";
const PIPE_BYTES: usize = 10000;
const PIPE_SIZE: i32 = 256 * 1024;

fn pattern(i: usize) -> u8 {
    (i * 31 % 251) as u8
}

fn open(path: &Path, flags: i32) -> Result<i32, String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "NUL in path".to_string())?;
    // SAFETY: NUL-terminated path we own.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(format!(
            "open {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

fn pos(fd: i32) -> i64 {
    // SAFETY: lseek on our own descriptor.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

fn write_all(fd: i32, data: &[u8]) -> Result<(), String> {
    let mut off = 0;
    while off < data.len() {
        // SAFETY: writing from the unwritten tail of our buffer.
        let n = unsafe { libc::write(fd, data[off..].as_ptr().cast(), data.len() - off) };
        if n <= 0 {
            return Err(format!(
                "write fd {fd}: {}",
                std::io::Error::last_os_error()
            ));
        }
        off += n as usize;
    }
    Ok(())
}

/// Read what is there (non-blocking descriptors) or until end of file.
fn read_some(fd: i32, max: usize) -> Vec<u8> {
    let mut buf = vec![0u8; max];
    let mut got = 0;
    while got < max {
        // SAFETY: reading into the unfilled tail of our buffer.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), max - got) };
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    buf.truncate(got);
    buf
}

fn wait_term() {
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Fds {
    shared: i32,
    shared_dup: i32,
    append: i32,
    null: i32,
    zero: i32,
    dir: i32,
    own_r: i32,
    own_w: i32,
    fifo: i32,
}

fn common_checks(who: &str, f: &Fds, fails: &mut Vec<String>) {
    for (name, fd) in [("shared", f.shared), ("its dup", f.shared_dup)] {
        if pos(fd) != 10 {
            fails.push(format!(
                "{who}: {name} (fd {fd}) is at offset {}, expected 10",
                pos(fd)
            ));
        }
    }
    if getfl(f.append) & libc::O_APPEND == 0 {
        fails.push(format!("{who}: fd {} lost O_APPEND", f.append));
    }
    let link = |fd: i32| {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    if link(f.null) != "/dev/null" || link(f.zero) != "/dev/zero" {
        fails.push(format!(
            "{who}: /dev/null and /dev/zero are {} and {}",
            link(f.null),
            link(f.zero)
        ));
    }
    let mut st: libc::stat = unsafe_zeroed_stat();
    // SAFETY: fstat into a local.
    if unsafe { libc::fstat(f.dir, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        fails.push(format!("{who}: fd {} is not the directory any more", f.dir));
    }
}

fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: struct stat is plain data; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The count of the second eventfd: every hex digit but 0 and d-f.
const BIG_COUNT: u64 = 0x1234_5678_9abc;

/// The mask the signalfd reads, as its fdinfo prints it.
fn sigmask_of(fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("sigmask:").map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// The event descriptors of the parent: two eventfds, two timerfds, signalfd.
struct Events {
    efd: i32,
    big: i32,
    tfd: i32,
    expired: i32,
    sfd: i32,
}

fn make_events() -> Result<Events, String> {
    let ns = |s: i64, n: i64| libc::timespec {
        tv_sec: s,
        tv_nsec: n,
    };
    // SAFETY: plain calls creating descriptors of this process, with
    // values we own.
    unsafe {
        let efd = libc::eventfd(
            5,
            libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
        );
        let big = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        let count = BIG_COUNT.to_ne_bytes();
        if big < 0 || libc::write(big, count.as_ptr().cast(), 8) != 8 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        let tfd = libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        );
        let its = libc::itimerspec {
            it_interval: ns(1, 500_000_000),
            it_value: ns(30, 0),
        };
        libc::timerfd_settime(tfd, 0, &its, std::ptr::null_mut());
        let expired = libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        );
        let once = libc::itimerspec {
            it_interval: ns(0, 0),
            it_value: ns(0, 1_000_000),
        };
        libc::timerfd_settime(expired, 0, &once, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigaddset(&mut set, libc::SIGRTMIN() + 3);
        libc::sigaddset(&mut set, libc::SIGRTMAX());
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let sfd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        libc::raise(libc::SIGUSR1);
        if efd < 0 || tfd < 0 || expired < 0 || sfd < 0 {
            return Err(format!(
                "event descriptors: {}",
                std::io::Error::last_os_error()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
        Ok(Events {
            efd,
            big,
            tfd,
            expired,
            sfd,
        })
    }
}

fn check_events(e: &Events, fails: &mut Vec<String>) {
    let read8 = |fd: i32| -> Option<u64> {
        let mut b = [0u8; 8];
        // SAFETY: reading 8 bytes into a local.
        let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
        (n == 8).then(|| u64::from_ne_bytes(b))
    };
    let sem: Vec<Option<u64>> = (0..6).map(|_| read8(e.efd)).collect();
    if sem != [Some(1), Some(1), Some(1), Some(1), Some(1), None] {
        fails.push(format!("eventfd (semaphore, count 5) read {sem:?}"));
    }
    match read8(e.big) {
        Some(BIG_COUNT) => {}
        other => fails.push(format!(
            "the eventfd with count {BIG_COUNT:#x} read {other:x?}"
        )),
    }
    // SIGUSR1, SIGUSR2, SIGRTMIN+3 and SIGRTMAX (glibc's SIGRTMIN is 34).
    let want = format!(
        "{:016x}",
        (1u64 << (libc::SIGUSR1 - 1))
            | (1 << (libc::SIGUSR2 - 1))
            | (1 << (libc::SIGRTMIN() + 3 - 1))
            | (1 << (libc::SIGRTMAX() - 1))
    );
    let mask = sigmask_of(e.sfd);
    if mask != want {
        fails.push(format!("the signalfd's mask is {mask}, expected {want}"));
    }
    // SAFETY: plain data, filled by timerfd_gettime.
    let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: reading our own timer's setting into a local.
    unsafe { libc::timerfd_gettime(e.tfd, &mut cur) };
    let left = cur.it_value.tv_sec as f64 + cur.it_value.tv_nsec as f64 / 1e9;
    if cur.it_interval.tv_sec != 1
        || cur.it_interval.tv_nsec != 500_000_000
        || !(0.0 < left && left <= 30.0)
    {
        fails.push(format!(
            "timerfd: {left:.3} s left and a period of {}.{:09} s; was 30 s and 1.5 s",
            cur.it_interval.tv_sec, cur.it_interval.tv_nsec
        ));
    }
    match read8(e.expired) {
        Some(1) => {}
        other => fails.push(format!(
            "the expired timerfd reads {other:?}, expected one expiry"
        )),
    }
    let mut info = [0u8; 128];
    // SAFETY: reading one signalfd_siginfo (128 bytes) into a local.
    let n = unsafe { libc::read(e.sfd, info.as_mut_ptr().cast(), 128) };
    let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
    if n != 128 || signo != libc::SIGUSR1 as u32 {
        fails.push(format!(
            "the signalfd read {n} bytes, signal {signo}; expected SIGUSR1"
        ));
    }
}

struct Socks {
    stream_parent: i32,
    stream_child: i32,
    dgram: [i32; 2],
    seq: [i32; 2],
    listen_path: i32,
    listen_abstract: i32,
    unbound: i32,
    path: PathBuf,
    abstract_name: Vec<u8>,
}

fn pair(ty: i32) -> Result<[i32; 2], String> {
    let mut sv = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into `sv`.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } != 0
    {
        return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
    }
    Ok(sv)
}

fn unix_addr(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (i, b) in name.iter().enumerate() {
        sa.sun_path[i] = *b as libc::c_char;
    }
    (sa, (2 + name.len()) as libc::socklen_t)
}

fn listener(name: &[u8]) -> Result<i32, String> {
    // SAFETY: plain socket calls on a new socket with an address we own.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        let (sa, len) = unix_addr(name);
        if s < 0
            || libc::bind(s, (&sa as *const libc::sockaddr_un).cast(), len) != 0
            || libc::listen(s, 8) != 0
        {
            return Err(format!("listener: {}", std::io::Error::last_os_error()));
        }
        Ok(s)
    }
}

fn make_socks(tmp: &Path) -> Result<Socks, String> {
    let stream = pair(libc::SOCK_STREAM)?;
    let dgram = pair(libc::SOCK_DGRAM)?;
    let seq = pair(libc::SOCK_SEQPACKET)?;
    for m in [&b"a"[..], b"bb", b"ccc"] {
        write_all(dgram[1], m)?;
    }
    write_all(seq[1], b"first packet")?;
    write_all(seq[1], b"second")?;
    // SAFETY: shutdown on our own socket.
    unsafe { libc::shutdown(seq[1], libc::SHUT_WR) };
    let path = tmp.join("listener.sock");
    let _ = std::fs::remove_file(&path);
    let listen_path = listener(path.as_os_str().as_encoded_bytes())?;
    let abstract_name = format!("\0cryo-test-{}", std::process::id()).into_bytes();
    let listen_abstract = listener(&abstract_name)?;
    // SAFETY: a plain socket call.
    let unbound = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    Ok(Socks {
        stream_parent: stream[0],
        stream_child: stream[1],
        dgram,
        seq,
        listen_path,
        listen_abstract,
        unbound,
        path,
        abstract_name,
    })
}

fn recv_all(fd: i32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        // SAFETY: receiving into our own buffer without blocking.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        out.push(buf[..n as usize].to_vec());
        if n == 0 {
            break;
        }
    }
    out
}

fn check_listener(what: &str, lfd: i32, name: &[u8], fails: &mut Vec<String>) {
    // SAFETY: plain socket calls on new sockets with an address we own.
    unsafe {
        let c = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        let (sa, len) = unix_addr(name);
        if libc::connect(c, (&sa as *const libc::sockaddr_un).cast(), len) != 0 {
            fails.push(format!(
                "connecting to the {what} listener: {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        let a = libc::accept(lfd, std::ptr::null_mut(), std::ptr::null_mut());
        if a < 0 {
            fails.push(format!(
                "accept on the {what} listener: {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        let _ = write_all(c, b"ping");
        let mut b = [0u8; 4];
        if libc::read(a, b.as_mut_ptr().cast(), 4) != 4 || &b != b"ping" {
            fails.push(format!(
                "no data through a connection accepted by the {what} listener"
            ));
        }
        libc::close(a);
        libc::close(c);
    }
}

fn check_socks(s: &Socks, fails: &mut Vec<String>) {
    let got = recv_all(s.stream_parent);
    if got.concat() != b"hello from child" {
        fails.push(format!("parent: the stream pair held {:?}", got));
    }
    let got = recv_all(s.dgram[0]);
    if got != [b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()] {
        fails.push(format!(
            "the datagram pair held {got:?}, expected a, bb, ccc"
        ));
    }
    let got = recv_all(s.seq[0]);
    if got != [b"first packet".to_vec(), b"second".to_vec(), Vec::new()] {
        fails.push(format!(
            "the seqpacket pair held {got:?}, expected two packets and end of file"
        ));
    }
    check_listener(
        "path",
        s.listen_path,
        s.path.as_os_str().as_encoded_bytes(),
        fails,
    );
    check_listener("abstract", s.listen_abstract, &s.abstract_name, fails);
    let mut ty: i32 = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: getsockopt into a local int.
    let r = unsafe {
        libc::getsockopt(
            s.unbound,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut i32).cast(),
            &mut len,
        )
    };
    if r != 0 || ty != libc::SOCK_DGRAM {
        fails.push("the unbound datagram socket is gone".into());
    }
}

struct Ghosts {
    memfd: i32,
    deleted: i32,
    /// Where the deleted file was: its descriptor's /proc link must name it.
    deleted_path: PathBuf,
    opath: i32,
}

fn make_ghosts(tmp: &Path) -> Result<Ghosts, String> {
    let name = c"cryo-memfd";
    // SAFETY: memfd_create with a NUL-terminated name.
    let memfd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if memfd < 0 {
        return Err("memfd_create".into());
    }
    write_all(memfd, b"memfd contents")?;
    // SAFETY: fcntl / lseek on our own descriptor.
    unsafe {
        libc::fcntl(
            memfd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        );
        libc::lseek(memfd, 3, libc::SEEK_SET);
    }
    let path = tmp.join("deleted.txt");
    let deleted = open(&path, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)?;
    write_all(deleted, b"deleted but open")?;
    let times = [
        libc::timespec {
            tv_sec: GHOST_ATIME.0,
            tv_nsec: GHOST_ATIME.1,
        },
        libc::timespec {
            tv_sec: GHOST_MTIME.0,
            tv_nsec: GHOST_MTIME.1,
        },
    ];
    // SAFETY: fchown/fchmod/futimens on our own descriptor; times is a
    // valid array of two timespecs.
    let r = unsafe {
        libc::fchown(deleted, GHOST_OWNER.0, GHOST_OWNER.1)
            | libc::fchmod(deleted, GHOST_MODE)
            | libc::futimens(deleted, times.as_ptr())
    };
    if r != 0 {
        return Err(format!(
            "owner, mode and times of the deleted file: {}",
            std::io::Error::last_os_error()
        ));
    }
    std::fs::remove_file(&path).map_err(|e| format!("unlink: {e}"))?;
    // SAFETY: lseek on our own descriptor.
    unsafe { libc::lseek(deleted, 8, libc::SEEK_SET) };
    let opath = open(&tmp.join("shared"), libc::O_PATH)?;
    Ok(Ghosts {
        memfd,
        deleted,
        deleted_path: path,
        opath,
    })
}

/// What the deleted file's owner, mode and times are set to (none of them
/// what a new file of root's would get).
const GHOST_OWNER: (u32, u32) = (4321, 8765);
const GHOST_MODE: libc::mode_t = 0o4751;
const GHOST_ATIME: (i64, i64) = (1_000_000_000, 123_456_789);
const GHOST_MTIME: (i64, i64) = (1_500_000_000, 987_654_321);

fn check_ghosts(g: &Ghosts, fails: &mut Vec<String>) {
    // Before anything reads it (a read may set the access time).
    let mut st = unsafe_zeroed_stat();
    // SAFETY: fstat into a local.
    unsafe { libc::fstat(g.deleted, &mut st) };
    let owner = (st.st_uid, st.st_gid);
    if owner != GHOST_OWNER {
        fails.push(format!(
            "the deleted file is owned by {owner:?}, expected {GHOST_OWNER:?}"
        ));
    }
    if st.st_mode & 0o7777 != GHOST_MODE {
        fails.push(format!(
            "the deleted file has mode {:o}, expected {GHOST_MODE:o}",
            st.st_mode & 0o7777
        ));
    }
    let (a, m) = (
        (st.st_atime, st.st_atime_nsec),
        (st.st_mtime, st.st_mtime_nsec),
    );
    if a != GHOST_ATIME || m != GHOST_MTIME {
        fails.push(format!(
            "the deleted file's access and modification times are {a:?} and {m:?}, expected {GHOST_ATIME:?} and {GHOST_MTIME:?}"
        ));
    }
    let got = read_some(g.memfd, 64);
    if got != b"fd contents" {
        fails.push(format!(
            "the memfd read {:?} from offset 3",
            String::from_utf8_lossy(&got)
        ));
    }
    // SAFETY: fcntl on our own descriptor.
    let seals = unsafe { libc::fcntl(g.memfd, libc::F_GET_SEALS) };
    if seals != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW {
        fails.push(format!("the memfd's seals are {seals:#x}"));
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", g.memfd)).unwrap_or_default();
    if link.to_string_lossy() != "/memfd:cryo-memfd (deleted)" {
        fails.push(format!("the memfd is {}", link.display()));
    }
    let got = read_some(g.deleted, 64);
    if got != b"but open" {
        fails.push(format!(
            "the deleted file read {:?} from offset 8",
            String::from_utf8_lossy(&got)
        ));
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", g.deleted)).unwrap_or_default();
    let want = format!("{} (deleted)", g.deleted_path.display());
    if link.to_string_lossy() != want {
        fails.push(format!(
            "the deleted file is {}, expected {want}",
            link.display()
        ));
    }
    let mut st = unsafe_zeroed_stat();
    // SAFETY: fstat into a local.
    unsafe { libc::fstat(g.deleted, &mut st) };
    if st.st_nlink != 0 {
        fails.push(format!("the deleted file has {} links", st.st_nlink));
    }
    if getfl(g.opath) & libc::O_PATH == 0 {
        fails.push("the O_PATH descriptor lost O_PATH".into());
    }
}

/// The last inotify watch (0x11).
const LAST_WATCH: i32 = 17;

fn make_inotify(tmp: &Path) -> Result<i32, String> {
    let watched = tmp.join("watched");
    std::fs::write(&watched, b"x").map_err(|e| format!("{e}"))?;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: inotify calls on our own instance with paths we own; the
    // events of the removed watch are read and dropped.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
        let w1 = libc::inotify_add_watch(fd, c(tmp).as_ptr(), libc::IN_CREATE);
        let w2 = libc::inotify_add_watch(fd, c(&tmp.join("shared")).as_ptr(), libc::IN_ACCESS);
        let w3 = libc::inotify_add_watch(fd, c(&watched).as_ptr(), libc::IN_MODIFY);
        libc::inotify_rm_watch(fd, w2);
        if (w1, w2, w3) != (1, 2, 3) {
            return Err(format!("inotify watches {w1} {w2} {w3}"));
        }
        // Watches 4 to 17: the kernel prints watch numbers in hexadecimal.
        for n in 4..=LAST_WATCH {
            let p = tmp.join(format!("watched-{n}"));
            std::fs::write(&p, b"x").map_err(|e| format!("{e}"))?;
            let w = libc::inotify_add_watch(fd, c(&p).as_ptr(), libc::IN_MODIFY | libc::IN_ATTRIB);
            if w != n {
                return Err(format!("inotify watch {w}, expected {n}"));
            }
        }
        let mut buf = [0u8; 4096];
        while libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
        Ok(fd)
    }
}

fn check_inotify(fd: i32, tmp: &Path, fails: &mut Vec<String>) {
    let _ = std::fs::write(tmp.join("created-after-restore"), b"");
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .open(tmp.join("watched"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"y"));
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .open(tmp.join(format!("watched-{LAST_WATCH}")))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"y"));
    std::thread::sleep(Duration::from_millis(20));
    let mut buf = [0u8; 4096];
    // SAFETY: reading events into our own buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let mut got = Vec::new();
    let mut off = 0usize;
    while n > 0 && off + 16 <= n as usize {
        let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default());
        let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap_or_default());
        let len =
            u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap_or_default()) as usize;
        got.push((wd, mask));
        off += 16 + len;
    }
    let want = [
        (1, libc::IN_CREATE),
        (3, libc::IN_MODIFY),
        (LAST_WATCH, libc::IN_MODIFY),
    ];
    if got != want {
        fails.push(format!("inotify reported {got:?}, expected {want:?}"));
    }
}

fn make_epoll(watch: &[(i32, u32, u64)]) -> Result<i32, String> {
    // SAFETY: a new epoll instance.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    for &(fd, events, data) in watch {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: adding our own descriptor with an event we own.
        if ep < 0 || unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(format!("epoll: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(ep)
}

/// A data word with every bit of its top byte set.
const EPOLL_HIGH: u64 = 0xfedc_ba98_7654_3210;

fn check_epoll(ep: i32, fails: &mut Vec<String>) {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
    // SAFETY: waiting into our own array of 8 events.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 8, 1000) };
    let mut got: Vec<u64> = evs[..n.max(0) as usize].iter().map(|e| e.u64).collect();
    got.sort_unstable();
    if got != [77, 0x5eed, EPOLL_HIGH] {
        fails.push(format!(
            "the epoll reported data words {got:x?}, expected 4d, 5eed and {EPOLL_HIGH:x}"
        ));
    }
}

fn connect_dgram(path: &Path) -> Result<i32, String> {
    // SAFETY: a new socket connected to an address we built.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        let (sa, len) = unix_addr(path.as_os_str().as_encoded_bytes());
        if s < 0 || libc::connect(s, (&sa as *const libc::sockaddr_un).cast(), len) != 0 {
            return Err(format!(
                "connecting to {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(s)
    }
}

fn run(
    ready: &Path,
    verdict: &Path,
    tmp: &Path,
    ext: Option<&Path>,
) -> Result<Vec<String>, String> {
    let ext = match ext {
        Some(p) => {
            let s = connect_dgram(p)?;
            write_all(s, b"before")?;
            Some(s)
        }
        None => None,
    };
    wl::install_term_handler()?;
    std::fs::create_dir_all(tmp).map_err(|e| format!("mkdir: {e}"))?;
    let shared = open(
        &tmp.join("shared"),
        libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
    )?;
    write_all(shared, &[b'x'; 100])?;
    // SAFETY: lseek / dup on our own descriptor.
    unsafe { libc::lseek(shared, 10, libc::SEEK_SET) };
    // SAFETY: as above.
    let shared_dup = unsafe { libc::fcntl(shared, libc::F_DUPFD_CLOEXEC, 0) };
    let append = open(
        &tmp.join("append"),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND,
    )?;
    write_all(append, b"first\n")?;
    let null = open(Path::new("/dev/null"), libc::O_RDWR)?;
    let zero = open(Path::new("/dev/zero"), libc::O_RDONLY)?;
    let dir = open(tmp, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut own = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `own`.
    if unsafe { libc::pipe2(own.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err("pipe2".into());
    }
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(own[0], libc::F_SETFL, libc::O_NONBLOCK) };
    write_all(own[1], b"in flight")?;
    let fifo_path = tmp.join("fifo");
    let _ = std::fs::remove_file(&fifo_path);
    let c = std::ffi::CString::new(fifo_path.as_os_str().as_encoded_bytes()).map_err(|_| "path")?;
    // SAFETY: NUL-terminated path we own.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err("mkfifo".into());
    }
    let fifo = open(&fifo_path, libc::O_RDWR | libc::O_NONBLOCK)?;
    write_all(fifo, b"fifo data")?;
    let f = Fds {
        shared,
        shared_dup,
        append,
        null,
        zero,
        dir,
        own_r: own[0],
        own_w: own[1],
        fifo,
    };
    let mut kid_pipe = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `kid_pipe`.
    if unsafe { libc::pipe2(kid_pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err("pipe2".into());
    }
    let kid_verdict = verdict.with_extension("child");
    let events = make_events()?;
    let socks = make_socks(tmp)?;
    let ghosts = make_ghosts(tmp)?;
    let inotify = make_inotify(tmp)?;
    // SAFETY: single-threaded; the child runs this program's own code.
    let kid = unsafe { libc::fork() };
    if kid == 0 {
        // A read end of the FIFO of the child's own (another open file
        // description of the same FIFO).
        let kid_fifo = open(&fifo_path, libc::O_RDONLY | libc::O_NONBLOCK);
        // SAFETY: closing the read end, which is the parent's.
        unsafe { libc::close(kid_pipe[0]) };
        // SAFETY: fcntl on our own pipe.
        unsafe { libc::fcntl(kid_pipe[1], libc::F_SETPIPE_SZ, PIPE_SIZE) };
        let data: Vec<u8> = (0..PIPE_BYTES).map(pattern).collect();
        let mut fails = Vec::new();
        if let Err(e) = write_all(kid_pipe[1], &data) {
            fails.push(e);
        }
        // SAFETY: closing the parent's end of the stream pair here.
        unsafe { libc::close(socks.stream_parent) };
        if let Err(e) = write_all(socks.stream_child, b"hello from child") {
            fails.push(e);
        }
        wait_term();
        common_checks("child", &f, &mut fails);
        match kid_fifo {
            Ok(fd) => {
                let got = read_some(fd, 64);
                if got != b"to child via fifo" {
                    fails.push(format!(
                        "child: its own FIFO read end got {:?}",
                        String::from_utf8_lossy(&got)
                    ));
                }
            }
            Err(e) => fails.push(e),
        }
        let got = recv_all(socks.stream_child);
        if got.concat() != b"to child" {
            fails.push(format!(
                "child: the stream pair held {got:?}, expected \"to child\""
            ));
        }
        // SAFETY: fcntl on our own pipe.
        let size = unsafe { libc::fcntl(kid_pipe[1], libc::F_GETPIPE_SZ) };
        if size != PIPE_SIZE {
            fails.push(format!(
                "child: pipe buffer is {size} bytes, was {PIPE_SIZE}"
            ));
        }
        // Move the shared offset: the parent must see it.
        // SAFETY: lseek on our own descriptor.
        unsafe { libc::lseek(f.shared, 50, libc::SEEK_SET) };
        let text: String = if fails.is_empty() {
            "PASS\n".into()
        } else {
            fails.iter().map(|l| format!("FAIL: {l}\n")).collect()
        };
        let _ = wl::write_atomic(&kid_verdict, text.as_bytes());
        // SAFETY: _exit without the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    if kid < 0 {
        return Err("fork".into());
    }
    // SAFETY: closing the write end, which is the child's alone, and the
    // child's end of the stream pair.
    unsafe {
        libc::close(kid_pipe[1]);
        libc::close(socks.stream_child);
    }
    write_all(socks.stream_parent, b"to child")?;
    let epfd = make_epoll(&[
        (f.own_r, libc::EPOLLIN as u32, EPOLL_HIGH),
        (
            socks.dgram[0],
            libc::EPOLLIN as u32 | libc::EPOLLET as u32,
            77,
        ),
        (events.efd, libc::EPOLLIN as u32, 0x5eed),
    ])?;
    // SAFETY: pidfd_open of our own child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, kid, 0) } as i32;
    if pidfd < 0 {
        return Err("pidfd_open".into());
    }
    // Wait until the child's bytes are all in the pipe.
    loop {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD into a local.
        unsafe { libc::ioctl(kid_pipe[0], libc::FIONREAD, &mut n) };
        if n as usize >= PIPE_BYTES {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    wl::write_atomic(ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    wait_term();
    let mut fails = Vec::new();
    if let Some(s) = ext {
        if let Err(e) = write_all(s, b"after") {
            fails.push(format!("sending to the outside peer: {e}"));
        }
    }
    check_epoll(epfd, &mut fails);
    let pid_line = std::fs::read_to_string(format!("/proc/self/fdinfo/{pidfd}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pid:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    if pid_line != kid.to_string() {
        fails.push(format!(
            "the pidfd names process {pid_line:?}, not the child {kid}"
        ));
    }
    common_checks("parent", &f, &mut fails);
    check_events(&events, &mut fails);
    check_socks(&socks, &mut fails);
    check_ghosts(&ghosts, &mut fails);
    check_inotify(inotify, tmp, &mut fails);
    if getfl(f.own_r) & libc::O_NONBLOCK == 0 {
        fails.push("parent: its pipe's read end lost O_NONBLOCK".into());
    }
    let got = read_some(f.own_r, 64);
    if got != b"in flight" {
        fails.push(format!(
            "parent: its own pipe held {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    let _ = f.own_w;
    let got = read_some(f.fifo, 64);
    // For the child, through the FIFO it opened itself.
    write_all(f.fifo, b"to child via fifo")?;
    if got != b"fifo data" {
        fails.push(format!(
            "parent: the FIFO held {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    write_all(f.append, b"second\n")?;
    let text = std::fs::read_to_string(tmp.join("append")).unwrap_or_default();
    if text != "first\nsecond\n" {
        fails.push(format!("parent: the O_APPEND file reads {text:?}"));
    }
    // SAFETY: kill of our own child.
    unsafe { libc::kill(kid, libc::SIGTERM) };
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(kid, &mut status, 0) };
    let kid_text = std::fs::read_to_string(&kid_verdict)
        .unwrap_or_else(|_| "FAIL: child wrote no verdict\n".into());
    fails.extend(
        kid_text
            .lines()
            .filter_map(|l| l.strip_prefix("FAIL: "))
            .map(String::from),
    );
    if pos(f.shared_dup) != 50 {
        fails.push(format!(
            "parent: the child moved the shared offset to 50, the parent's dup is at {}",
            pos(f.shared_dup)
        ));
    }
    let data = read_some(kid_pipe[0], PIPE_BYTES + 100);
    let want: Vec<u8> = (0..PIPE_BYTES).map(pattern).collect();
    if data != want {
        fails.push(format!(
            "parent: read {} bytes from the child's pipe (then end of file), expected its {PIPE_BYTES}{}",
            data.len(),
            if data.len() == PIPE_BYTES { " (different bytes)" } else { "" }
        ));
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_fds --ready FILE --verdict FILE --tmp DIR [--ext-dgram PATH]";
    let a = wl::Args::parse(usage);
    let Some(tmp) = a.get("tmp").map(PathBuf::from) else {
        eprintln!("usage: {usage}");
        std::process::exit(2);
    };
    let ext = a.get("ext-dgram").map(PathBuf::from);
    wl::close_extra_fds();
    let result = run(&a.ready, &a.verdict, &tmp, ext.as_deref());
    wl::finish(NAME, &a.verdict, result);
}
