//! A pipe leading outside the tree (a supervisor's log pipe, as runc
//! hands a detached container): `dump --external-pipe pipe:[INODE]` keeps
//! it as such, and `restore --inherit-fd fd[N]:pipe:[INODE]` gives the
//! restored tree the caller's end of the same pipe. The same for a unix
//! socket connected to the caller (`--external unix[INODE]`, then
//! `--inherit-fd fd[N]:socket:[INODE]`). The test holds the other end and
//! reads the counter's lines before and after.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use cryo_tests::*;

/// The counts in the lines read from `r` within `t` (at least `n` of them).
fn counts(r: &mut std::fs::File, n: usize, t: Duration) -> Vec<u64> {
    let start = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let got: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("count ").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        if got.len() >= n || start.elapsed() > t {
            return got;
        }
        match r.read(&mut buf) {
            Ok(k) if k > 0 => text.push_str(&String::from_utf8_lossy(&buf[..k])),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn inode(fd: &OwnedFd) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("the descriptor's inode")
}

#[test]
fn pipe_to_the_caller_given_back_with_inherit_fd() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a live array.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(made, 0);
    // SAFETY: both were just made and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let key = format!("pipe:[{}]", inode(&r));
    given_back(r, w, &key, &["--external-pipe", &key]);
}

#[test]
fn socket_to_the_caller_given_back_with_inherit_fd() {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, a live array.
    let made = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(made, 0);
    // SAFETY: both were just made and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let ino = inode(&w);
    let key = format!("socket:[{ino}]");
    given_back(r, w, &key, &["--external", &format!("unix[{ino}]")]);
}

/// The counter writes to `w` (its standard output); the test reads `r`;
/// `key` names `w`'s file, `flag` is the dump's option for it.
fn given_back(r: OwnedFd, w: OwnedFd, key: &str, flag: &[&str]) {
    let pid = spawn_counter(
        std::process::Stdio::from(w.try_clone().expect("dup")),
        std::process::Stdio::null(),
    );
    let guard = TreeGuard::new(vec![pid]);
    let mut rf = std::fs::File::from(r);
    let before = counts(&mut rf, 3, Duration::from_secs(5));
    assert!(before.len() >= 3, "the counter wrote {before:?}");
    let dir = TestDir::new();
    let img = dir.subdir("img");
    // Refused without the flag: it leads to this test.
    let refused = dump(pid, &img, &[], &[]);
    assert!(
        !refused.status.success(),
        "{key} to outside was dumped unasked"
    );
    let why = stderr_of(&refused);
    assert!(why.contains("outside"), "{why}");
    let out = dump(pid, &img, flag, &[]);
    assert_cryo_ok(&out, &format!("cryo dump {flag:?}"));
    assert!(reap_gone(&[pid], Duration::from_secs(10)));
    // What the counter wrote before it was killed, read off.
    let _ = counts(&mut rf, usize::MAX, Duration::from_millis(100));
    // Without the descriptor: refused naming the flag.
    let bare = restore_detached(&img);
    assert!(!bare.status.success(), "restored without the pipe");
    assert!(
        stderr_of(&bare).contains(&format!("--inherit-fd fd[N]:{key}")),
        "{}",
        stderr_of(&bare)
    );
    let raw = w.as_raw_fd();
    let mut cmd = std::process::Command::new(cryo_bin());
    cmd.args(["restore", "-d", "-D", img.to_str().expect("utf-8")])
        .arg("--inherit-fd")
        .arg(format!("fd[3]:{key}"));
    // SAFETY: dup2 is async-signal-safe; `raw` is open in the child (the
    // fork copied it while `w` was held).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("running cryo restore --inherit-fd");
    assert!(
        out.status.success(),
        "cryo restore --inherit-fd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = counts(&mut rf, 3, Duration::from_secs(5));
    drop(guard);
    assert!(
        after.len() >= 3,
        "nothing came through the pipe after the restore: {after:?}"
    );
    assert!(
        after[0] > *before.last().unwrap_or(&0) && after.windows(2).all(|w| w[1] == w[0] + 1),
        "before {before:?}, after {after:?}"
    );
}
