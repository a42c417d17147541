//! A process in a network namespace of its own with only its loopback,
//! which a restore must make again with the loopback's state, the
//! namespace's sysctls and the unix sockets bound in it.
//!
//! `wl_netns --ready FILE --verdict FILE [--split 1]`
//!
//! The process unshares its network namespace, brings its loopback up
//! with an MTU of 16384, sets net.core.somaxconn to 1234 and
//! net.ipv4.ip_local_port_range to "40000 50000", binds a listening unix
//! socket to an abstract name (which only this namespace sees) and forks
//! a child that stays in the namespace. On SIGTERM it checks the
//! loopback, the sysctls, that a new socket of its own connects to the
//! abstract name and the listener accepts it, what the child says of its
//! namespace, and that the namespace is not the one it started in.
//!
//! With `--split 1` the tree spans two network namespaces: the process
//! stays in the host's with a listener of its own abstract name, and its
//! child makes the new namespace (all of the above is the child's): each
//! must reach its own name and not the other's.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_netns";
const SYSCTLS: [(&str, &str); 2] = [
    ("net/core/somaxconn", "1234"),
    ("net/ipv4/ip_local_port_range", "40000\t50000"),
];
const MTU: i32 = 16384;

fn net_ns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// An ifreq for `lo`.
fn lo_request() -> libc::ifreq {
    // SAFETY: zeroed is a valid ifreq.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, &s) in r.ifr_name.iter_mut().zip(b"lo") {
        *d = s as libc::c_char;
    }
    r
}

/// A device ioctl on `lo` through a new datagram socket.
fn lo_ioctl(req: libc::c_ulong, r: &mut libc::ifreq) -> Result<(), String> {
    // SAFETY: socket takes plain values; the ioctl reads and writes only
    // the ifreq; the socket is closed after.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if s < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let rc = libc::ioctl(s, req, r as *mut libc::ifreq);
        let e = std::io::Error::last_os_error();
        libc::close(s);
        if rc < 0 {
            return Err(format!("ioctl {req:#x} on lo: {e}"));
        }
    }
    Ok(())
}

fn setup() -> Result<(), String> {
    let mut r = lo_request();
    r.ifr_ifru.ifru_mtu = MTU;
    lo_ioctl(libc::SIOCSIFMTU, &mut r)?;
    let mut r = lo_request();
    lo_ioctl(libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    lo_ioctl(libc::SIOCSIFFLAGS, &mut r)?;
    for (name, v) in SYSCTLS {
        std::fs::write(format!("/proc/sys/{name}"), v).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

fn check_lo(fails: &mut Vec<String>) {
    let mut r = lo_request();
    if let Err(e) = lo_ioctl(libc::SIOCGIFFLAGS, &mut r) {
        fails.push(e);
        return;
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { r.ifr_ifru.ifru_flags } as i32;
    if flags & libc::IFF_UP == 0 {
        fails.push(format!("lo is down (flags {flags:#x})"));
    }
    let mut r = lo_request();
    let _ = lo_ioctl(libc::SIOCGIFMTU, &mut r);
    // SAFETY: SIOCGIFMTU filled the mtu member.
    let mtu = unsafe { r.ifr_ifru.ifru_mtu };
    if mtu != MTU {
        fails.push(format!("lo's MTU is {mtu}, not {MTU}"));
    }
    for (name, v) in SYSCTLS {
        let now = std::fs::read_to_string(format!("/proc/sys/{name}")).unwrap_or_default();
        if now.trim_end() != v {
            fails.push(format!("{name} is {:?}, not {v:?}", now.trim_end()));
        }
    }
}

/// A listener bound to abstract name `name` (no file: the namespace's own).
fn listen_abstract(name: &str) -> Result<UnixListener, String> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| format!("address: {e}"))?;
    UnixListener::bind_addr(&addr).map_err(|e| format!("bind @{name}: {e}"))
}

fn connect_abstract(name: &str) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    UnixStream::connect_addr(&addr)
}

/// Whether a new socket connects to abstract name `name` (and the
/// listener `l` accepts it).
fn reaches(name: &str, l: Option<&UnixListener>) -> bool {
    connect_abstract(name).is_ok() && l.is_none_or(|l| l.accept().is_ok())
}

/// `--split`: the parent in the host's namespace, the child in its own.
fn run_split(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let host = net_ns();
    let mine = format!("cryo-wl-netns-host-{}", std::process::id());
    let theirs = format!("cryo-wl-netns-{}", std::process::id());
    let listener = listen_abstract(&mine)?;
    let (cmd, back, ready) = (wl::pipe()?, wl::pipe()?, wl::pipe()?);
    // SAFETY: fork of this single-threaded process; the child makes its
    // namespace, then answers with its checks until `cmd` closes.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: unshare takes a flag.
        let made = if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            Err("unshare(CLONE_NEWNET)".to_string())
        } else {
            setup().and_then(|()| listen_abstract(&theirs))
        };
        wl::write_fd(ready[1], if made.is_ok() { b"y" } else { b"n" });
        let own = made.ok();
        wl::serve(cmd[0], back[1], &[cmd[1], back[0], ready[0]], || {
            let mut fails = Vec::new();
            check_lo(&mut fails);
            if net_ns() == host {
                fails.push("the child is in the host's network namespace".into());
            }
            if !reaches(&theirs, own.as_ref()) {
                fails.push(format!("the child does not reach @{theirs}"));
            }
            if reaches(&mine, None) {
                fails.push(format!("the child reaches the host's @{mine}"));
            }
            fails.join("; ")
        });
    }
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    let mut b = [0u8; 1];
    if !wl::read_exact(ready[0], &mut b) || b[0] != b'y' {
        return Err("the child did not make its namespace".into());
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    if net_ns() != host {
        fails.push("the parent left the host's network namespace".into());
    }
    if !reaches(&mine, Some(&listener)) {
        fails.push(format!("the parent does not reach @{mine}"));
    }
    if reaches(&theirs, None) {
        fails.push(format!("the parent reaches the child's @{theirs}"));
    }
    let said = wl::ask(cmd[1], back[0]);
    if !said.is_empty() {
        fails.push(said);
    }
    wl::end_server(cmd[1], child);
    Ok(fails)
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let host = net_ns();
    // SAFETY: unshare takes a flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    setup()?;
    let name = format!("cryo-wl-netns-{}", std::process::id());
    let listener = listen_abstract(&name)?;
    let (cmd, back) = (wl::pipe()?, wl::pipe()?);
    // SAFETY: fork of this single-threaded process; the child answers
    // with its namespace until `cmd` closes.
    let child = unsafe { libc::fork() };
    if child == 0 {
        wl::serve(cmd[0], back[1], &[cmd[1], back[0]], net_ns);
    }
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    let mine = net_ns();
    if mine == host {
        fails.push(format!("in the host's network namespace {mine}"));
    }
    check_lo(&mut fails);
    match connect_abstract(&name) {
        Ok(_c) => {
            if let Err(e) = listener.accept() {
                fails.push(format!("the listener did not accept: {e}"));
            }
        }
        Err(e) => fails.push(format!("connecting to @{name}: {e}")),
    }
    let said = wl::ask(cmd[1], back[0]);
    if said != mine {
        fails.push(format!("the child is in {said:?}, not {mine:?}"));
    }
    wl::end_server(cmd[1], child);
    Ok(fails)
}

fn main() {
    let usage = "wl_netns --ready FILE --verdict FILE [--split 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = if a.get("split") == Some("1") {
        run_split(&a)
    } else {
        run(&a)
    };
    wl::finish(NAME, &a.verdict, result);
}
