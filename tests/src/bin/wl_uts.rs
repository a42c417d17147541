//! Processes in UTS namespaces of their own, which a restore must make
//! again with their names.
//!
//! `wl_uts --ready FILE --verdict FILE [--back-to-host 1]`
//!
//! The parent P unshares its UTS namespace (A: hostname cryo-uts-a,
//! domain cryo-dom-a) and forks C1, which stays in A, and C2, which
//! unshares again (B: cryo-uts-b, cryo-dom-b) and forks G, which stays in
//! B. On SIGTERM P checks its own names, that its namespace is not the
//! one it started in, that C1 shares it and C2 does not, that G shares C2's
//! (by their /proc/PID/ns/uts links), and what names each child reports
//! through a pipe.
//!
//! With `--back-to-host`, C1 goes back to the host's UTS namespace (setns),
//! under a parent in another one, which cryo refuses (the checks then
//! expect C1 there).

use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_uts";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn names() -> (String, String) {
    // SAFETY: zeroed is a valid utsname; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the local struct.
    unsafe { libc::uname(&mut u) };
    let f = |b: &[libc::c_char]| {
        let v: Vec<u8> = b
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&v).into_owned()
    };
    (f(&u.nodename), f(&u.domainname))
}

fn new_uts(host: &str, domain: &str) -> Result<(), String> {
    // SAFETY: unshare takes a flag; the name calls read exactly `len`
    // bytes of live strings.
    let r = unsafe {
        libc::unshare(libc::CLONE_NEWUTS)
            | libc::sethostname(host.as_ptr().cast(), host.len())
            | libc::setdomainname(domain.as_ptr().cast(), domain.len())
    };
    if r != 0 {
        return Err(os_err("unshare(CLONE_NEWUTS)/sethostname"));
    }
    Ok(())
}

fn uts_link(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/uts"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// fork(); the child serves on `cmd` after `before` ran.
fn fork_serving(cmd: i32, back: i32, ends: &[i32], before: impl FnOnce()) -> Result<i32, String> {
    // SAFETY: fork of this single-threaded process; the child runs
    // `before` and serves, never returning.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        before();
        wl::serve(cmd, back, ends, || {
            let (h, d) = names();
            format!("{h} {d}")
        })
    }
    if pid < 0 {
        return Err(os_err("fork"));
    }
    Ok(pid)
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let back_to_host = a.get("back-to-host") == Some("1");
    // The namespace it was started in (the host's), kept open for C1.
    let me = std::process::id() as i32;
    let host_link = uts_link(me);
    let host = std::fs::File::open("/proc/self/ns/uts").map_err(|e| format!("ns: {e}"))?;
    let host = std::os::fd::IntoRawFd::into_raw_fd(host);
    new_uts("cryo-uts-a", "cryo-dom-a")?;
    let (to_c1, to_c2, to_g, back, ready) = (
        wl::pipe()?,
        wl::pipe()?,
        wl::pipe()?,
        wl::pipe()?,
        wl::pipe()?,
    );
    let ends = [to_c1[1], to_c2[1], to_g[1]];
    let c1 = fork_serving(to_c1[0], back[1], &ends, || {
        if back_to_host && setns_uts(host) != 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(1) };
        }
        // SAFETY: closing our copy of the namespace file.
        unsafe { libc::close(host) };
        wl::write_fd(ready[1], b"c");
    })?;
    // SAFETY: as above, in the parent (C2 does not inherit it).
    unsafe { libc::close(host) };
    let c2 = fork_serving(to_c2[0], back[1], &ends, || {
        if new_uts("cryo-uts-b", "cryo-dom-b").is_err() {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(1) };
        }
        let g = fork_serving(to_g[0], back[1], &ends, || wl::write_fd(ready[1], b"g"));
        wl::write_fd(ready[1], format!("p{}\n", g.unwrap_or(-1)).as_bytes());
    })?;
    // C1's "c", G's "g" and G's pid from C2 ("p<pid>\n", written at once),
    // in any order.
    let mut got = String::new();
    while !(got.contains('c') && got.contains('g') && got.contains('\n')) {
        let mut b = [0u8; 1];
        if !wl::read_exact(ready[0], &mut b) {
            return Err("a child did not start".into());
        }
        got.push(b[0] as char);
    }
    let g: i32 = got
        .split_once('p')
        .and_then(|(_, r)| r.split('\n').next()?.parse().ok())
        .ok_or("no grandchild pid")?;
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    if names() != ("cryo-uts-a".to_string(), "cryo-dom-a".to_string()) {
        fails.push(format!("the parent's names are {:?}", names()));
    }
    let mine = uts_link(me);
    if mine == host_link || mine.is_empty() {
        fails.push(format!("the parent is in the host's UTS namespace {mine}"));
    }
    let c1_ns = if back_to_host {
        host_link.clone()
    } else {
        mine.clone()
    };
    if uts_link(c1) != c1_ns || uts_link(c2) == mine || uts_link(g) != uts_link(c2) {
        fails.push(format!(
            "namespaces: parent {mine}, C1 {}, C2 {}, G {}",
            uts_link(c1),
            uts_link(c2),
            uts_link(g)
        ));
    }
    for (who, cmd, want) in [
        ("C1", to_c1[1], "cryo-uts-a cryo-dom-a"),
        ("C2", to_c2[1], "cryo-uts-b cryo-dom-b"),
        ("G", to_g[1], "cryo-uts-b cryo-dom-b"),
    ] {
        wl::write_fd(cmd, b"?");
        let said = wl::read_line(back[0]);
        // Back in the host's namespace, C1 has the host's names.
        if said != want && !(back_to_host && who == "C1") {
            fails.push(format!("{who} says its names are {said:?}, not {want:?}"));
        }
    }
    // SAFETY: closing our command pipes ends the children; then wait for
    // our own two.
    unsafe {
        for fd in [to_c1[1], to_c2[1], to_g[1]] {
            libc::close(fd);
        }
        libc::waitpid(c1, std::ptr::null_mut(), 0);
        libc::waitpid(c2, std::ptr::null_mut(), 0);
    }
    Ok(fails)
}

fn setns_uts(fd: i32) -> i32 {
    // SAFETY: setns takes a descriptor and a flag.
    unsafe { libc::setns(fd, libc::CLONE_NEWUTS) }
}

fn main() {
    let usage = "wl_uts --ready FILE --verdict FILE [--back-to-host 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
