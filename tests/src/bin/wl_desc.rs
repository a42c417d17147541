//! Descriptors whose finer state must come back: files without a name
//! made by O_TMPFILE, sparse files, symbolic links opened as O_PATH, a
//! pidfd of a reaped process, signal ownership, and locks.
//!
//! `wl_desc --ready FILE --verdict FILE --tmp DIR`
//!
//! - `tmpfile`: open(DIR, O_TMPFILE) holding "tmpfile data", at offset 4;
//!   after the restore it is still a file without a name in DIR, and
//!   linking it in (linkat) gives a file with its bytes;
//! - `sparse`: DIR/sparse.dat, 64 MiB with 4 KiB of data at 0 and at
//!   32 MiB, deleted while open; and a memfd of 32 MiB with data at 16 MiB:
//!   same bytes, same size, and their holes still holes (few blocks);
//! - `symlink`: DIR/link -> "no-such-target", open O_PATH | O_NOFOLLOW;
//! - `dead pidfd`: a pidfd of a child that exited and was reaped: its
//!   fdinfo says Pid -1 and poll reports it readable;
//! - `owner`: a pipe's read end with O_ASYNC, F_SETOWN_EX to this process
//!   and F_SETSIG SIGRTMIN+3: a write after the restore delivers it;
//! - `locks`: flock(LOCK_EX) on DIR/flocked, a POSIX write lock on bytes
//!   0-99 of DIR/posix, an OFD read lock on bytes 10-19 of DIR/ofd and a
//!   read lease on DIR/leased, each seen again in its fdinfo;
//! - `epoll`: an epoll watching a pipe added as a number since closed
//!   (the pipe lives on at another number) and an eventfd added as a
//!   number now holding /dev/null: both still report their events, with
//!   their data words, and the numbers are as the program left them;
//! - `unix names`: a listener bound to DIR/gone.sock, whose socket file
//!   was removed, and a datagram socket bound to DIR/taken.sock, whose
//!   name now belongs to a regular file: the removed name stays removed,
//!   the regular file untouched, and both sockets still know their name
//!   (the second one a name of cryo's next to it, after a restore);
//! - `senders`: a datagram socket bound to DIR/r.sock with four
//!   messages queued from three senders (one bound to DIR/a.sock, one
//!   unnamed, one with an abstract name): they come in order, each with
//!   its sender's address, and the receiver keeps its name;
//! - `inotify renamed`: an inotify instance watching DIR/watched
//!   (IN_MODIFY) and DIR/wdir (IN_CREATE), both renamed since (to
//!   DIR/moved and DIR/mdir), and DIR/removed (IN_MODIFY), removed since
//!   but held open: after the restore, writing the first, creating a
//!   file in the second and writing the third through the descriptor
//!   held report their watches;
//! - `linked`: DIR/big.dat (16 KiB), open, also linked as DIR/other-name,
//!   then removed under its first name: after the restore the descriptor
//!   holds its bytes and, with `--expect-linked 1` (a dump with
//!   --link-remap and a ghost limit below its size), is the very file
//!   DIR/other-name still names; no name of cryo's is left in DIR;
//! - `hung-up pty`: the slave of a pty whose master it closed: its node is
//!   gone, reads give end of file and writes fail with EIO;
//! - `pending`: a listener on DIR/pend.sock with two connections it has
//!   not accepted (one from a socket bound to DIR/c1.sock, one unnamed):
//!   after the restore it accepts them in that order, and bytes flow.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cryo_tests::wl;

const NAME: &str = "wl_desc";
const MIB: i64 = 1 << 20;
const F_SETSIG: i32 = 10;
const F_GETSIG: i32 = 11;
const F_SETOWN_EX: i32 = 15;
const F_GETOWN_EX: i32 = 16;
const F_OWNER_PID: i32 = 1;

static SIGNALS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_io(_sig: i32) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

#[repr(C)]
struct OwnerEx {
    kind: i32,
    pid: i32,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths")
}

fn open(p: &Path, flags: i32, mode: u32) -> Result<i32, String> {
    // SAFETY: a NUL-terminated path we own.
    let fd = unsafe { libc::open(c(p).as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(os_err(&format!("open {}", p.display())));
    }
    Ok(fd)
}

fn pwrite(fd: i32, data: &[u8], off: i64) -> Result<(), String> {
    // SAFETY: writes from our buffer.
    if unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off) } != data.len() as isize {
        return Err(os_err("pwrite"));
    }
    Ok(())
}

fn pread(fd: i32, len: usize, off: i64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    // SAFETY: reads into our buffer.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), len, off) };
    b.truncate(n.max(0) as usize);
    b
}

fn fstat(fd: i32) -> libc::stat {
    // SAFETY: zeroed is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::fstat(fd, &mut st) };
    st
}

fn fdinfo(fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default()
}

fn link_of(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct Desc {
    tmp: PathBuf,
    tmpfile: i32,
    sparse: i32,
    memfd: i32,
    symlink: i32,
    pidfd: i32,
    pipe: [i32; 2],
    locked: [i32; 4],
    /// The listener with two connections not accepted, and the two
    /// connecting sockets.
    pending: [i32; 3],
    /// The slave of a pty whose master was closed.
    hung_up: i32,
    /// The deleted file still linked as DIR/other-name.
    linked: i32,
    /// The inotify instance, its three watch descriptors (the third on
    /// a file removed since, held open by the fourth descriptor).
    inotify: [i32; 5],
    /// The datagram receiver and its three senders (kept open).
    senders: [i32; 4],
    /// The listener whose socket file was removed, the datagram socket
    /// whose name was taken.
    named: [i32; 2],
    /// The epoll, the pipe's write end, the eventfd's number now, the
    /// number the pipe was added as (closed), the eventfd's old number
    /// (now /dev/null).
    epoll: [i32; 5],
}

/// A sparse file's data: 4 KiB of `tag` at each offset.
fn sparse_data(tag: u8) -> Vec<u8> {
    (0..4096).map(|i| tag ^ (i % 251) as u8).collect()
}

fn setup(tmp: &Path) -> Result<Desc, String> {
    let tmpfile = open(tmp, libc::O_TMPFILE | libc::O_RDWR, 0o640)?;
    pwrite(tmpfile, b"tmpfile data", 0)?;
    // SAFETY: lseek on our descriptor.
    unsafe { libc::lseek(tmpfile, 4, libc::SEEK_SET) };

    let p = tmp.join("sparse.dat");
    let sparse = open(&p, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 0o600)?;
    pwrite(sparse, &sparse_data(1), 0)?;
    pwrite(sparse, &sparse_data(2), 32 * MIB)?;
    // SAFETY: ftruncate of our file.
    if unsafe { libc::ftruncate(sparse, 64 * MIB) } != 0 {
        return Err(os_err("ftruncate"));
    }
    std::fs::remove_file(&p).map_err(|e| format!("unlink: {e}"))?;
    // SAFETY: memfd_create with a NUL-terminated name.
    let memfd = unsafe { libc::memfd_create(c"cryo-sparse".as_ptr(), libc::MFD_CLOEXEC) };
    if memfd < 0 {
        return Err(os_err("memfd_create"));
    }
    pwrite(memfd, &sparse_data(3), 16 * MIB)?;
    // SAFETY: ftruncate of our memfd.
    if unsafe { libc::ftruncate(memfd, 32 * MIB) } != 0 {
        return Err(os_err("ftruncate"));
    }

    let l = tmp.join("link");
    std::os::unix::fs::symlink("no-such-target", &l).map_err(|e| format!("symlink: {e}"))?;
    let symlink = open(&l, libc::O_PATH | libc::O_NOFOLLOW, 0)?;

    // SAFETY: the child only exits.
    let kid = unsafe { libc::fork() };
    if kid == 0 {
        // SAFETY: see above.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: pidfd_open of our child, then reaping it.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, kid, 0) } as i32;
    // SAFETY: waits for our child.
    unsafe { libc::waitpid(kid, std::ptr::null_mut(), 0) };
    if pidfd < 0 {
        return Err("pidfd_open".into());
    }

    let mut pipe = [0; 2];
    // SAFETY: pipe2 into a local array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(os_err("pipe2"));
    }
    // SAFETY: a handler that only bumps an atomic counter.
    unsafe { libc::signal(libc::SIGRTMIN() + 3, on_io as extern "C" fn(i32) as usize) };
    let owner = OwnerEx {
        kind: F_OWNER_PID,
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() },
    };
    // SAFETY: fcntl on our pipe with a live f_owner_ex and plain ints.
    unsafe {
        if libc::fcntl(pipe[0], F_SETOWN_EX, &owner as *const OwnerEx) != 0
            || libc::fcntl(pipe[0], F_SETSIG, libc::SIGRTMIN() + 3) != 0
            || libc::fcntl(pipe[0], libc::F_SETFL, libc::O_NONBLOCK | libc::O_ASYNC) != 0
        {
            return Err(os_err("F_SETOWN_EX/F_SETSIG/O_ASYNC"));
        }
    }

    let mk = |name: &str, flags: i32| open(&tmp.join(name), flags | libc::O_CREAT, 0o644);
    let flocked = mk("flocked", libc::O_RDWR)?;
    let posix = mk("posix", libc::O_RDWR)?;
    let ofd = mk("ofd", libc::O_RDWR)?;
    let leased = mk("leased", libc::O_RDONLY)?;
    let lock = |fd: i32, cmd: i32, t: i32, start: i64, len: i64| {
        // SAFETY: zeroed is a valid flock.
        let mut l: libc::flock = unsafe { std::mem::zeroed() };
        l.l_type = t as i16;
        l.l_whence = libc::SEEK_SET as i16;
        l.l_start = start;
        l.l_len = len;
        // SAFETY: the command reads one flock, a live local.
        unsafe { libc::fcntl(fd, cmd, &l as *const libc::flock) }
    };
    // SAFETY: flock and fcntl on our own descriptors.
    unsafe {
        if libc::flock(flocked, libc::LOCK_EX | libc::LOCK_NB) != 0
            || lock(posix, libc::F_SETLK, libc::F_WRLCK, 0, 100) != 0
            || lock(ofd, libc::F_OFD_SETLK, libc::F_RDLCK, 10, 10) != 0
            || libc::fcntl(leased, libc::F_SETLEASE, libc::F_RDLCK) != 0
        {
            return Err(os_err("taking the locks"));
        }
    }
    let named = setup_named(tmp)?;
    let senders = setup_senders(tmp)?;
    let inotify = setup_inotify(tmp)?;
    let hung_up = setup_hung_up()?;
    let linked = setup_linked(tmp)?;
    let pending = setup_pending(tmp)?;
    // Last: the number it closes must stay free.
    let epoll = setup_epoll()?;
    Ok(Desc {
        epoll,
        named,
        senders,
        inotify,
        hung_up,
        linked,
        pending,
        tmp: tmp.to_path_buf(),
        tmpfile,
        sparse,
        memfd,
        symlink,
        pidfd,
        pipe,
        locked: [flocked, posix, ofd, leased],
    })
}

/// An epoll whose targets were added as numbers the program changed
/// since: see the module note.
fn setup_epoll() -> Result<[i32; 5], String> {
    let mut p = [0; 2];
    // SAFETY: pipe2 into a local array; epoll_create1 and eventfd take
    // plain values.
    let (ep, ev) = unsafe {
        if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return Err(os_err("pipe2"));
        }
        (
            libc::epoll_create1(libc::EPOLL_CLOEXEC),
            libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK),
        )
    };
    if ep < 0 || ev < 0 {
        return Err(os_err("epoll_create1/eventfd"));
    }
    let add = |fd: i32, data: u64| {
        let mut e = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: epoll_ctl with a live event of ours.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut e) }
    };
    if add(p[0], 0x1111) != 0 || add(ev, 0x2222) != 0 {
        return Err(os_err("epoll_ctl"));
    }
    // SAFETY: dup, close and open on our own descriptors and a literal
    // path.
    let (moved_pipe, moved_ev) = unsafe {
        let a = libc::fcntl(p[0], libc::F_DUPFD_CLOEXEC, 100);
        let b = libc::fcntl(ev, libc::F_DUPFD_CLOEXEC, 100);
        libc::close(p[0]);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        libc::dup3(null, ev, libc::O_CLOEXEC);
        libc::close(null);
        (a, b)
    };
    if moved_pipe < 0 || moved_ev < 0 {
        return Err(os_err("dup"));
    }
    Ok([ep, p[1], moved_ev, p[0], ev])
}

fn bound(ty: i32, path: &Path) -> Result<i32, String> {
    // SAFETY: socket/bind with a sockaddr_un of ours.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0);
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as u16;
        for (i, b) in path.as_os_str().as_bytes().iter().enumerate().take(107) {
            a.sun_path[i] = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as u32;
        if s < 0 || libc::bind(s, (&a as *const libc::sockaddr_un).cast(), len) != 0 {
            return Err(os_err("bind"));
        }
        Ok(s)
    }
}

fn setup_named(tmp: &Path) -> Result<[i32; 2], String> {
    let gone = tmp.join("gone.sock");
    let l = bound(libc::SOCK_STREAM, &gone)?;
    // SAFETY: listen on our socket.
    if unsafe { libc::listen(l, 4) } != 0 {
        return Err(os_err("listen"));
    }
    std::fs::remove_file(&gone).map_err(|e| format!("unlink: {e}"))?;
    let taken = tmp.join("taken.sock");
    let d = bound(libc::SOCK_DGRAM, &taken)?;
    std::fs::write(tmp.join("taken.new"), b"not a socket").map_err(|e| format!("write: {e}"))?;
    std::fs::rename(tmp.join("taken.new"), &taken).map_err(|e| format!("rename: {e}"))?;
    Ok([l, d])
}

/// The path a unix socket of ours is bound to.
fn sock_name(s: i32) -> String {
    // SAFETY: getsockname into a zeroed sockaddr_un of ours.
    unsafe {
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as u32;
        libc::getsockname(s, (&mut a as *mut libc::sockaddr_un).cast(), &mut len);
        let bytes: Vec<u8> = a
            .sun_path
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn check_named(d: &Desc, fails: &mut Vec<String>) {
    let t = d.tmp.display().to_string();
    let [l, dg] = d.named;
    if sock_name(l) != format!("{t}/gone.sock") {
        fails.push(format!("the listener is bound to {}", sock_name(l)));
    }
    if d.tmp.join("gone.sock").exists() {
        fails.push("gone.sock, removed by the program, is back".into());
    }
    let name = sock_name(dg);
    let next_to = format!("{t}/taken.sock.cryo-sock-");
    if name != format!("{t}/taken.sock") && !name.starts_with(&next_to) {
        fails.push(format!("the datagram socket is bound to {name}"));
    }
    if std::fs::read(d.tmp.join("taken.sock")).unwrap_or_default() != b"not a socket" {
        fails.push("the file that took taken.sock's name was changed".into());
    }
    let strays: Vec<String> = std::fs::read_dir(&d.tmp)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("cryo-sock"))
                .collect()
        })
        .unwrap_or_default();
    if !strays.is_empty() {
        fails.push(format!("names cryo made are left in {t}: {strays:?}"));
    }
}

fn connect_to(s: i32, path: &Path) -> Result<(), String> {
    // SAFETY: connect with a sockaddr_un of ours.
    unsafe {
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as u16;
        for (i, b) in path.as_os_str().as_bytes().iter().enumerate().take(107) {
            a.sun_path[i] = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as u32;
        if libc::connect(s, (&a as *const libc::sockaddr_un).cast(), len) != 0 {
            return Err(os_err("connect"));
        }
    }
    Ok(())
}

/// A listener and two sockets connected to it, not accepted.
fn setup_pending(tmp: &Path) -> Result<[i32; 3], String> {
    let lp = tmp.join("pend.sock");
    let l = bound(libc::SOCK_STREAM, &lp)?;
    // SAFETY: listen on our socket.
    if unsafe { libc::listen(l, 8) } != 0 {
        return Err(os_err("listen"));
    }
    let c1 = bound(libc::SOCK_STREAM, &tmp.join("c1.sock"))?;
    connect_to(c1, &lp)?;
    // SAFETY: a new socket of ours.
    let c2 = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if c2 < 0 {
        return Err(os_err("socket"));
    }
    connect_to(c2, &lp)?;
    Ok([l, c1, c2])
}

fn check_pending(d: &Desc, fails: &mut Vec<String>) {
    let t = d.tmp.display().to_string();
    let [l, c1, c2] = d.pending;
    for (i, (c, peer)) in [(c1, format!("{t}/c1.sock")), (c2, String::new())]
        .into_iter()
        .enumerate()
    {
        // SAFETY: accept on our listener (it has connections waiting; no
        // address asked for).
        let a = unsafe {
            libc::accept4(
                l,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if a < 0 {
            fails.push(format!(
                "accepting pending connection {i}: {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        // SAFETY: getpeername into a zeroed sockaddr_un of ours.
        let got = unsafe {
            let mut sa: libc::sockaddr_un = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_un>() as u32;
            libc::getpeername(a, (&mut sa as *mut libc::sockaddr_un).cast(), &mut len);
            let b: Vec<u8> = sa
                .sun_path
                .iter()
                .take_while(|&&x| x != 0)
                .map(|&x| x as u8)
                .collect();
            String::from_utf8_lossy(&b).into_owned()
        };
        if got != peer {
            fails.push(format!(
                "pending connection {i} came from {got:?}, expected {peer:?}"
            ));
        }
        let msg = format!("hello {i}");
        // SAFETY: write and read with local buffers on our sockets.
        let n = unsafe {
            libc::write(c, msg.as_ptr().cast(), msg.len());
            std::thread::sleep(Duration::from_millis(10));
            let mut b = [0u8; 32];
            let n = libc::read(a, b.as_mut_ptr().cast(), 32);
            (n.max(0) as usize, b)
        };
        if &n.1[..n.0] != msg.as_bytes() {
            fails.push(format!(
                "pending connection {i} carried {:?}",
                String::from_utf8_lossy(&n.1[..n.0])
            ));
        }
    }
}

fn setup_linked(tmp: &Path) -> Result<i32, String> {
    let big = tmp.join("big.dat");
    let fd = open(&big, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    pwrite(fd, &[b'L'; 16384], 0)?;
    std::fs::hard_link(&big, tmp.join("other-name")).map_err(|e| format!("link: {e}"))?;
    std::fs::remove_file(&big).map_err(|e| format!("unlink: {e}"))?;
    Ok(fd)
}

fn check_linked(d: &Desc, expect_linked: bool, fails: &mut Vec<String>) {
    let other = d.tmp.join("other-name");
    let st = fstat(d.linked);
    let ino = std::fs::metadata(&other).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    if expect_linked && ino.ok() != Some(st.st_ino) {
        fails.push("the deleted file is not the one other-name still names".into());
    }
    if pread(d.linked, 16384, 0) != vec![b'L'; 16384] {
        fails.push("the deleted, still linked file lost its bytes".into());
    }
    let strays: Vec<String> = std::fs::read_dir(&d.tmp)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("cryo-link"))
                .collect()
        })
        .unwrap_or_default();
    if !strays.is_empty() {
        fails.push(format!("links cryo made are left: {strays:?}"));
    }
}

/// A pty slave whose master is closed.
fn setup_hung_up() -> Result<i32, String> {
    // SAFETY: posix_openpt, grantpt, unlockpt, ptsname_r into a local
    // buffer, open of the NUL-terminated name, close of the master.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 || libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            return Err(os_err("posix_openpt"));
        }
        let mut name = [0 as libc::c_char; 64];
        if libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0 {
            return Err(os_err("ptsname_r"));
        }
        let s = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(os_err("open the pty slave"));
        }
        libc::close(m);
        Ok(s)
    }
}

fn check_hung_up(d: &Desc, fails: &mut Vec<String>) {
    let s = d.hung_up;
    let link = link_of(s);
    if !(link.starts_with("/dev/pts/") && link.ends_with(" (deleted)")) {
        fails.push(format!("the hung-up pty slave is {link}"));
    }
    let mut b = [0u8; 8];
    // SAFETY: reads into and writes from local buffers.
    let (r, w) = unsafe {
        (
            libc::read(s, b.as_mut_ptr().cast(), 8),
            libc::write(s, b"x".as_ptr().cast(), 1),
        )
    };
    let werr = std::io::Error::last_os_error().raw_os_error();
    if r != 0 || w != -1 || werr != Some(libc::EIO) {
        fails.push(format!(
            "the hung-up pty slave read {r} and wrote {w} ({werr:?}), expected 0 and EIO"
        ));
    }
}

fn setup_inotify(tmp: &Path) -> Result<[i32; 5], String> {
    std::fs::write(tmp.join("watched"), b"w").map_err(|e| format!("write: {e}"))?;
    std::fs::write(tmp.join("removed"), b"r").map_err(|e| format!("write: {e}"))?;
    let held = open(&tmp.join("removed"), libc::O_WRONLY, 0)?;
    std::fs::create_dir(tmp.join("wdir")).map_err(|e| format!("mkdir: {e}"))?;
    // SAFETY: inotify calls with NUL-terminated paths of ours.
    let (fd, w1, w2, w3) = unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
        (
            fd,
            libc::inotify_add_watch(fd, c(&tmp.join("watched")).as_ptr(), libc::IN_MODIFY),
            libc::inotify_add_watch(fd, c(&tmp.join("wdir")).as_ptr(), libc::IN_CREATE),
            libc::inotify_add_watch(fd, c(&tmp.join("removed")).as_ptr(), libc::IN_MODIFY),
        )
    };
    if fd < 0 || w1 < 0 || w2 < 0 || w3 < 0 {
        return Err(os_err("inotify"));
    }
    std::fs::rename(tmp.join("watched"), tmp.join("moved")).map_err(|e| format!("rename: {e}"))?;
    std::fs::rename(tmp.join("wdir"), tmp.join("mdir")).map_err(|e| format!("rename: {e}"))?;
    // Held open, so the watch stays (IN_ATTRIB is not asked for).
    std::fs::remove_file(tmp.join("removed")).map_err(|e| format!("unlink: {e}"))?;
    // The renames' own events (IN_MOVE_SELF is not asked for): none.
    let mut buf = [0u8; 512];
    // SAFETY: reads into a local buffer; nothing is queued.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    Ok([fd, w1, w2, w3, held])
}

fn check_inotify(d: &Desc, fails: &mut Vec<String>) {
    let [fd, w1, w2, w3, held] = d.inotify;
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .open(d.tmp.join("moved"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"more"));
    let _ = std::fs::write(d.tmp.join("mdir").join("new"), b"n");
    // SAFETY: writes to our descriptor of the removed file.
    unsafe { libc::write(held, b"more".as_ptr().cast(), 4) };
    std::thread::sleep(Duration::from_millis(50));
    let mut buf = [0u8; 1024];
    // SAFETY: reads into a local buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let mut got = Vec::new();
    let mut off = 0usize;
    while off + 16 <= n.max(0) as usize {
        let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default());
        let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap_or_default());
        let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap_or_default());
        got.push((wd, mask));
        off += 16 + len as usize;
    }
    let want = vec![
        (w1, libc::IN_MODIFY),
        (w2, libc::IN_CREATE),
        (w3, libc::IN_MODIFY),
    ];
    if got != want {
        fails.push(format!("inotify reported {got:x?}, expected {want:x?}"));
    }
}

/// The abstract name of the third sender.
fn abstract_name() -> Vec<u8> {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let mut n = vec![0u8];
    n.extend_from_slice(format!("cryo-wl-desc-{me}").as_bytes());
    n
}

/// A unix datagram socket bound to `name` (a path, or abstract with a
/// leading NUL; empty: unnamed).
fn dgram_named(name: &[u8]) -> Result<i32, String> {
    // SAFETY: socket/bind with a sockaddr_un of ours of the right length.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(os_err("socket"));
        }
        if name.is_empty() {
            return Ok(s);
        }
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as u16;
        for (i, b) in name.iter().enumerate().take(107) {
            a.sun_path[i] = *b as libc::c_char;
        }
        let len = (2 + name.len() + usize::from(name[0] != 0)) as u32;
        if libc::bind(s, (&a as *const libc::sockaddr_un).cast(), len) != 0 {
            return Err(os_err("bind"));
        }
        Ok(s)
    }
}

fn setup_senders(tmp: &Path) -> Result<[i32; 4], String> {
    let r_path = tmp.join("r.sock");
    let r = dgram_named(r_path.as_os_str().as_bytes())?;
    let a = dgram_named(tmp.join("a.sock").as_os_str().as_bytes())?;
    let b = dgram_named(b"")?;
    let c = dgram_named(&abstract_name())?;
    for (s, m) in [
        (a, &b"from a"[..]),
        (b, b"from b"),
        (a, b"a again"),
        (c, b"from c"),
    ] {
        // SAFETY: sendto with a sockaddr_un of ours.
        unsafe {
            let mut to: libc::sockaddr_un = std::mem::zeroed();
            to.sun_family = libc::AF_UNIX as u16;
            for (i, x) in r_path.as_os_str().as_bytes().iter().enumerate().take(107) {
                to.sun_path[i] = *x as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as u32;
            if libc::sendto(
                s,
                m.as_ptr().cast(),
                m.len(),
                0,
                (&to as *const libc::sockaddr_un).cast(),
                len,
            ) < 0
            {
                return Err(os_err("sendto"));
            }
        }
    }
    Ok([r, a, b, c])
}

fn check_senders(d: &Desc, fails: &mut Vec<String>) {
    let t = d.tmp.display().to_string();
    let r = d.senders[0];
    if sock_name(r) != format!("{t}/r.sock") {
        fails.push(format!(
            "the datagram receiver is bound to {:?}",
            sock_name(r)
        ));
    }
    let want: [(&[u8], Vec<u8>); 4] = [
        (b"from a", format!("{t}/a.sock").into_bytes()),
        (b"from b", Vec::new()),
        (b"a again", format!("{t}/a.sock").into_bytes()),
        (b"from c", abstract_name()),
    ];
    for (i, (data, from)) in want.iter().enumerate() {
        let mut buf = [0u8; 64];
        // SAFETY: recvfrom into local buffers of the given sizes.
        let (n, got_from) = unsafe {
            let mut a: libc::sockaddr_un = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_un>() as u32;
            let n = libc::recvfrom(
                r,
                buf.as_mut_ptr().cast(),
                64,
                libc::MSG_DONTWAIT,
                (&mut a as *mut libc::sockaddr_un).cast(),
                &mut len,
            );
            let path_len = (len as usize).saturating_sub(2).min(108);
            let raw: Vec<u8> = a.sun_path[..path_len].iter().map(|&c| c as u8).collect();
            let name = if raw.first() == Some(&0) {
                raw
            } else {
                raw.split(|&b| b == 0).next().unwrap_or(&[]).to_vec()
            };
            (n, name)
        };
        let got = &buf[..n.max(0) as usize];
        if got != *data || got_from != *from {
            fails.push(format!(
                "datagram {i}: {:?} from {:?}, expected {:?} from {:?}",
                String::from_utf8_lossy(got),
                String::from_utf8_lossy(&got_from),
                String::from_utf8_lossy(data),
                String::from_utf8_lossy(from)
            ));
        }
    }
}

fn check_epoll(d: &Desc, fails: &mut Vec<String>) {
    let [ep, pipe_w, ev, closed, reused] = d.epoll;
    // SAFETY: writes to our pipe and eventfd.
    unsafe {
        libc::write(pipe_w, b"e".as_ptr().cast(), 1);
        let one = 1u64;
        libc::write(ev, (&one as *const u64).cast(), 8);
    }
    let mut got = Vec::new();
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: epoll_wait into a local array of 4.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 1000) };
    for e in &evs[..n.max(0) as usize] {
        got.push(e.u64);
    }
    got.sort_unstable();
    if got != [0x1111, 0x2222] {
        fails.push(format!(
            "the epoll reported data words {got:x?}, expected 1111 and 2222"
        ));
    }
    // SAFETY: fcntl on numbers of ours.
    if unsafe { libc::fcntl(closed, libc::F_GETFD) } >= 0 {
        fails.push(format!("fd {closed}, which the program closed, is open"));
    }
    let st = fstat(reused);
    if st.st_mode & libc::S_IFMT != libc::S_IFCHR {
        fails.push(format!("fd {reused} is no longer /dev/null"));
    }
}

fn check_files(d: &Desc, fails: &mut Vec<String>) {
    let t = d.tmp.display().to_string();
    let link = link_of(d.tmpfile);
    let nameless = link
        .strip_prefix(&format!("{t}/#"))
        .and_then(|r| r.strip_suffix(" (deleted)"))
        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
    if !nameless {
        fails.push(format!("the O_TMPFILE file is {link}"));
    }
    // SAFETY: lseek on our descriptor.
    let at = unsafe { libc::lseek(d.tmpfile, 0, libc::SEEK_CUR) };
    if pread(d.tmpfile, 64, 0) != b"tmpfile data" || at != 4 {
        fails.push(format!(
            "the O_TMPFILE file lost its bytes or offset ({at})"
        ));
    }
    let named = d.tmp.join("linked-in");
    let proc = CString::new(format!("/proc/self/fd/{}", d.tmpfile)).expect("no NUL");
    // SAFETY: linkat of our O_TMPFILE file (through /proc) to a new name.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc.as_ptr(),
            libc::AT_FDCWD,
            c(&named).as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        fails.push(os_err("linking the O_TMPFILE file in"));
    } else {
        if std::fs::read(&named).unwrap_or_default() != b"tmpfile data" {
            fails.push("the O_TMPFILE file, linked in, lost its bytes".into());
        }
        let _ = std::fs::remove_file(&named);
    }
    for (what, fd, size, data) in [
        (
            "sparse file",
            d.sparse,
            64 * MIB,
            vec![(0, 1u8), (32 * MIB, 2)],
        ),
        ("sparse memfd", d.memfd, 32 * MIB, vec![(16 * MIB, 3)]),
    ] {
        let st = fstat(fd);
        if st.st_size != size {
            fails.push(format!("the {what} is {} bytes, not {size}", st.st_size));
        }
        for (off, tag) in data {
            if pread(fd, 4096, off) != sparse_data(tag) {
                fails.push(format!("the {what} lost its data at {off}"));
            }
        }
        if pread(fd, 4096, 4 * MIB) != vec![0u8; 4096] {
            fails.push(format!("a hole of the {what} does not read as zeros"));
        }
        if st.st_blocks * 512 > MIB {
            fails.push(format!(
                "the {what} takes {} blocks: its holes were filled",
                st.st_blocks
            ));
        }
    }
    let st = fstat(d.symlink);
    let mut buf = [0u8; 64];
    // SAFETY: readlinkat of our O_PATH descriptor into a local buffer.
    let n = unsafe { libc::readlinkat(d.symlink, c"".as_ptr(), buf.as_mut_ptr().cast(), 64) };
    let target = &buf[..n.max(0) as usize];
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK || target != b"no-such-target" {
        fails.push(format!(
            "the O_PATH symlink is mode {:o} pointing to {:?}",
            st.st_mode,
            String::from_utf8_lossy(target)
        ));
    }
}

fn check_pidfd_and_owner(d: &Desc, fails: &mut Vec<String>) {
    if !fdinfo(d.pidfd)
        .lines()
        .any(|l| l.starts_with("Pid:") && l.ends_with("-1"))
    {
        fails.push(format!("the dead pidfd's fdinfo: {:?}", fdinfo(d.pidfd)));
    }
    let mut p = libc::pollfd {
        fd: d.pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll one pollfd of ours, without waiting.
    if unsafe { libc::poll(&mut p, 1, 0) } != 1 {
        fails.push("the dead pidfd does not poll readable".into());
    }
    let mut o = OwnerEx { kind: -1, pid: 0 };
    // SAFETY: fcntl on our pipe into a live f_owner_ex.
    let sig = unsafe {
        libc::fcntl(d.pipe[0], F_GETOWN_EX, &mut o as *mut OwnerEx);
        libc::fcntl(d.pipe[0], F_GETSIG)
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    if (o.kind, o.pid, sig) != (F_OWNER_PID, me, libc::SIGRTMIN() + 3) {
        fails.push(format!(
            "the pipe's owner is {} {} with signal {sig}",
            o.kind, o.pid
        ));
    }
    let before = SIGNALS.load(Ordering::SeqCst);
    // SAFETY: writes one byte to our pipe.
    unsafe { libc::write(d.pipe[1], b"x".as_ptr().cast(), 1) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while SIGNALS.load(Ordering::SeqCst) == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    if SIGNALS.load(Ordering::SeqCst) == before {
        fails.push("no SIGRTMIN+3 came for the O_ASYNC pipe".into());
    }
}

fn check_locks(d: &Desc, fails: &mut Vec<String>) {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let want = [
        ("flocked", "FLOCK", "WRITE", "0 EOF"),
        ("posix", "POSIX", "WRITE", "0 99"),
        ("ofd", "OFDLCK", "READ", "10 19"),
        ("leased", "LEASE", "READ", "0 EOF"),
    ];
    for (fd, (name, kind, mode, range)) in d.locked.iter().zip(want) {
        let info = fdinfo(*fd);
        let found = info
            .lines()
            .filter_map(|l| l.strip_prefix("lock:"))
            .any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() >= 8
                    && w[1] == kind
                    && w[3] == mode
                    && format!("{} {}", w[6], w[7]) == range
                    && (kind != "POSIX" || w[4] == me.to_string())
            });
        if !found {
            fails.push(format!("no {kind} {mode} lock {range} on {name}: {info:?}"));
        }
    }
}

fn run(a: &wl::Args, tmp: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let d = setup(tmp)?;
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    check_files(&d, &mut fails);
    check_pidfd_and_owner(&d, &mut fails);
    check_locks(&d, &mut fails);
    check_epoll(&d, &mut fails);
    check_named(&d, &mut fails);
    check_senders(&d, &mut fails);
    check_inotify(&d, &mut fails);
    check_hung_up(&d, &mut fails);
    check_linked(&d, a.get("expect-linked") == Some("1"), &mut fails);
    check_pending(&d, &mut fails);
    Ok(fails)
}

fn main() {
    let usage = "wl_desc --ready FILE --verdict FILE --tmp DIR";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let tmp = a.tmp_dir(NAME, usage);
    let result = run(&a, &tmp);
    wl::finish(NAME, &a.verdict, result);
}
