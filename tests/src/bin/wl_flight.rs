//! Descriptors in flight (SCM_RIGHTS): messages queued in unix sockets
//! that carry descriptors, some of which only the messages hold.
//!
//! `wl_flight --ready FILE --verdict FILE --tmp DIR [--flight-epoll 1]`
//!
//! - `files`: a datagram pair with three messages queued, the second
//!   carrying four descriptors: a memfd and a file the program closed
//!   since (only the message holds them), an eventfd it still holds, and
//!   a pipe's read end it closed (keeping the write end); after the
//!   restore the messages come in order, the memfd and file with their
//!   bytes, the eventfd the same open file as the one held, and bytes
//!   written to the pipe come out of the end received;
//! - `sockets`: a stream socket X sent and closed (its peer XP kept),
//!   with "to-x" queued for it and, after that, a message carrying a
//!   datagram socket Y, also closed, with "to-y" queued for it (its peer
//!   YP kept); "to-xp" is queued for XP. After the restore X comes out of
//!   the message, X reads "to-x" and then Y, Y reads "to-y", and what X
//!   and Y send reaches XP and YP after what was queued.
//!
//! `--flight-epoll 1` also sends an epoll and closes it, which cryo must
//! refuse (an epoll is made by the task that holds it).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::msg::{recv_with_fds, send_with_fds};
use cryo_tests::wl;

const NAME: &str = "wl_flight";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn pread(fd: i32, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    // SAFETY: reads into our buffer.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), len, 0) };
    b.truncate(n.max(0) as usize);
    b
}

fn pair(ty: i32) -> Result<[i32; 2], String> {
    let mut sv = [0; 2];
    // SAFETY: socketpair into a local array.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } != 0
    {
        return Err(os_err("socketpair"));
    }
    Ok(sv)
}

fn close(fd: i32) {
    // SAFETY: closing a descriptor of ours: a message keeps its file.
    unsafe { libc::close(fd) };
}

fn write(fd: i32, data: &[u8]) {
    // SAFETY: writes from our buffer.
    unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
}

/// Up to `want` bytes from stream `s`, message after message, and the
/// descriptors that came with them.
fn read_stream(s: i32, want: usize) -> (Vec<u8>, Vec<i32>) {
    let (mut got, mut fds) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        if got.len() >= want {
            break;
        }
        let (b, f) = recv_with_fds(s, want - got.len());
        if b.is_empty() {
            break;
        }
        got.extend(b);
        fds.extend(f);
    }
    (got, fds)
}

struct Flight {
    /// The receiving end of the pair with files in flight, the eventfd
    /// sent and held, the pipe's write end.
    files: [i32; 3],
    /// The receiving end of the pair with sockets in flight, XP, YP.
    sockets: [i32; 3],
}

/// "first", "rights" with a memfd, an eventfd, a file and a pipe's read
/// end, "last".
fn setup_files(tmp: &Path) -> Result<[i32; 3], String> {
    let sv = pair(libc::SOCK_DGRAM)?;
    // SAFETY: memfd_create and eventfd take plain values.
    let (mfd, efd) = unsafe {
        (
            libc::memfd_create(c"cryo-flight".as_ptr(), libc::MFD_CLOEXEC),
            libc::eventfd(7, libc::EFD_CLOEXEC),
        )
    };
    if mfd < 0 || efd < 0 {
        return Err(os_err("memfd_create/eventfd"));
    }
    // SAFETY: writes from our buffer.
    unsafe { libc::pwrite(mfd, b"in flight memfd".as_ptr().cast(), 15, 0) };
    let p = tmp.join("flight.txt");
    std::fs::write(&p, b"in flight file").map_err(|e| format!("write: {e}"))?;
    let path = CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: opens a NUL-terminated path of ours.
    let file = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let mut pipe = [0; 2];
    // SAFETY: pipe2 into a local array.
    if file < 0 || unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("open/pipe2"));
    }
    send_with_fds(sv[0], b"first", &[])?;
    send_with_fds(sv[0], b"rights", &[mfd, efd, file, pipe[0]])?;
    send_with_fds(sv[0], b"last", &[])?;
    for fd in [mfd, file, pipe[0]] {
        close(fd);
    }
    std::fs::remove_file(&p).map_err(|e| format!("unlink: {e}"))?;
    Ok([sv[1], efd, pipe[1]])
}

/// X (stream, peer XP) in flight holding "to-x" and Y (datagram, peer
/// YP) holding "to-y"; "to-xp" queued for XP.
fn setup_sockets() -> Result<[i32; 3], String> {
    let carrier = pair(libc::SOCK_DGRAM)?;
    let [x, xp] = pair(libc::SOCK_STREAM)?;
    let [y, yp] = pair(libc::SOCK_DGRAM)?;
    send_with_fds(yp, b"to-y", &[])?;
    send_with_fds(xp, b"to-x", &[])?;
    send_with_fds(xp, b"with-y", &[y])?;
    close(y);
    send_with_fds(x, b"to-xp", &[])?;
    send_with_fds(carrier[0], b"sockets", &[x])?;
    close(x);
    Ok([carrier[1], xp, yp])
}

/// An epoll in flight, closed here.
fn flight_epoll() -> Result<(), String> {
    let carrier = pair(libc::SOCK_DGRAM)?;
    // SAFETY: epoll_create1 takes a flag only.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(os_err("epoll_create1"));
    }
    send_with_fds(carrier[0], b"epoll", &[ep])?;
    close(ep);
    Ok(())
}

fn check_files(f: &[i32; 3], fails: &mut Vec<String>) {
    let [s, efd, pipe_w] = *f;
    let (a, _) = recv_with_fds(s, 64);
    let (b, fds) = recv_with_fds(s, 64);
    let (c, _) = recv_with_fds(s, 64);
    if (a.as_slice(), b.as_slice(), c.as_slice())
        != (
            b"first".as_slice(),
            b"rights".as_slice(),
            b"last".as_slice(),
        )
    {
        fails.push(format!(
            "the messages in flight were {:?}, {:?}, {:?}",
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b),
            String::from_utf8_lossy(&c)
        ));
    }
    if fds.len() != 4 {
        fails.push(format!(
            "the message carried {} descriptors, not 4",
            fds.len()
        ));
        return;
    }
    write(pipe_w, b"piped");
    let mut b = [0u8; 16];
    // SAFETY: reads into a local buffer.
    let n = unsafe { libc::read(fds[3], b.as_mut_ptr().cast(), b.len()) };
    let got = &b[..n.max(0) as usize];
    if got != b"piped" {
        fails.push(format!(
            "the pipe end in flight read {:?}",
            String::from_utf8_lossy(got)
        ));
    }
    if pread(fds[0], 64) != b"in flight memfd" {
        fails.push("the memfd in flight lost its bytes".into());
    }
    // SAFETY: getpid has no preconditions; kcmp compares two of our
    // descriptors.
    let same = unsafe {
        let me = libc::getpid();
        libc::syscall(libc::SYS_kcmp, me, me, 0, fds[1], efd)
    };
    if same != 0 {
        fails.push("the eventfd in flight is not the one the program holds".into());
    }
    if pread(fds[2], 64) != b"in flight file" {
        fails.push("the file in flight lost its bytes".into());
    }
}

fn check_sockets(f: &[i32; 3], fails: &mut Vec<String>) {
    let [carrier, xp, yp] = *f;
    let (m, fds) = recv_with_fds(carrier, 64);
    let [x] = fds[..] else {
        fails.push(format!(
            "the message {:?} carried {} descriptors, not the socket",
            String::from_utf8_lossy(&m),
            fds.len()
        ));
        return;
    };
    let (got, inner) = read_stream(x, 10);
    if got != b"to-xwith-y" {
        fails.push(format!(
            "the socket in flight read {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    let [y] = inner[..] else {
        fails.push(format!(
            "the socket in flight carried {} descriptors, not the inner socket",
            inner.len()
        ));
        return;
    };
    let (to_y, _) = recv_with_fds(y, 64);
    if to_y != b"to-y" {
        fails.push(format!(
            "the socket in flight in a socket in flight read {:?}",
            String::from_utf8_lossy(&to_y)
        ));
    }
    let _ = send_with_fds(x, b"back", &[]);
    let _ = send_with_fds(y, b"y-back", &[]);
    let (at_xp, _) = read_stream(xp, 9);
    let (at_yp, _) = recv_with_fds(yp, 64);
    if at_xp != b"to-xpback" || at_yp != b"y-back" {
        fails.push(format!(
            "the peers of the sockets in flight read {:?} and {:?}",
            String::from_utf8_lossy(&at_xp),
            String::from_utf8_lossy(&at_yp)
        ));
    }
}

fn run(a: &wl::Args, tmp: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let f = Flight {
        files: setup_files(tmp)?,
        sockets: setup_sockets()?,
    };
    if a.get("flight-epoll") == Some("1") {
        flight_epoll()?;
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    check_files(&f.files, &mut fails);
    check_sockets(&f.sockets, &mut fails);
    Ok(fails)
}

fn main() {
    let usage = "wl_flight --ready FILE --verdict FILE --tmp DIR [--flight-epoll 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let tmp = a.tmp_dir(NAME, usage);
    let result = run(&a, &tmp);
    wl::finish(NAME, &a.verdict, result);
}
