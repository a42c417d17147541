//! Dirty tracking kept between two commands (`cryo pre-dump`, then a
//! dump or pre-dump with `--prev-images-dir`): the userfaultfd of each
//! tracked process (asynchronous write-protection, see precopy) must stay
//! open, or the kernel drops the tracking. A small holder process, `cryo
//! track-hold`, keeps them: it gets them from the pre-dump over a socket
//! pair, listens on `track.sock` in the image directory, hands them all
//! to the first command that connects and ends. It ends as well, closing
//! them (the tasks run on untouched), when every tracked process is gone
//! or after its time limit. Its pid is in `track.pid` there.
//!
//! Protocol (SOCK_SEQPACKET, both ways): one message per process, its
//! pid as 4 bytes (little-endian) with its userfaultfd (SCM_RIGHTS), then
//! an empty message.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::sock;

/// The holder's socket in an image directory.
pub const SOCKET: &str = "track.sock";
/// The holder's pid in an image directory.
pub const PID_FILE: &str = "track.pid";

/// Send each (pid, userfaultfd) of `fds` over `s`, then the end.
fn send_all(s: &impl AsFd, fds: &[(i32, OwnedFd)]) -> std::io::Result<()> {
    for (pid, fd) in fds {
        sock::send_with_fd(s, &pid.to_le_bytes(), Some(fd))?;
    }
    sock::send_with_fd(s, &[], None)
}

/// Receive what [`send_all`] sent.
fn recv_all(s: &impl AsFd) -> std::io::Result<Vec<(i32, OwnedFd)>> {
    let mut out = Vec::new();
    loop {
        let mut bytes = [0u8; 4];
        match sock::recv_with_fd(s, &mut bytes)? {
            (0, _) => return Ok(out),
            (4, Some(fd)) => out.push((i32::from_le_bytes(bytes), fd)),
            _ => return Err(std::io::Error::other("a malformed message from the holder")),
        }
    }
}

/// Hand the userfaultfds `fds` (by pid) to a new holder for image
/// directory `dir`, which keeps them for at most `limit`. Returns its pid.
pub fn hold(dir: &Path, fds: Vec<(i32, OwnedFd)>, limit: Duration) -> Result<i32, String> {
    let (ours, theirs) = sock::unix_socketpair(libc::SOCK_SEQPACKET)
        .map_err(|e| format!("a socket pair for the holder: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("cryo's own path: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("track-hold")
        .arg("--dir")
        .arg(dir)
        .arg("--secs")
        .arg(limit.as_secs().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    sock::pass_as(&mut cmd, &theirs, 3);
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting the holder: {e}"))?;
    drop(theirs);
    send_all(&ours, &fds).map_err(|e| format!("handing the tracking to the holder: {e}"))?;
    // It answers once it listens.
    let mut ok = [0u8; 1];
    let (got, _) = sock::recv_with_fd(&ours, &mut ok).map_err(|e| format!("the holder: {e}"))?;
    if got != 1 {
        return Err("the holder ended before it listened".into());
    }
    Ok(child.id() as i32)
}

/// `cryo track-hold`: keep the userfaultfds that come on descriptor 3,
/// listen on `dir`/track.sock, hand them to the first that connects.
pub fn serve(dir: &Path, limit: Duration) -> Result<(), String> {
    // Where `hold` put the socket pair's end for this process.
    let from = sock::inherited(3).map_err(|e| format!("descriptor 3: {e}"))?;
    let fds = recv_all(&from).map_err(|e| format!("receiving the tracking: {e}"))?;
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let l = sock::unix_socket(libc::SOCK_SEQPACKET).map_err(|e| e.to_string())?;
    let addr = sock::UnixAddr::new(path.as_os_str().as_encoded_bytes())
        .ok_or_else(|| format!("{}: too long for a socket", path.display()))?;
    sock::bind(&l, &addr).map_err(|e| format!("{}: {e}", path.display()))?;
    // The image's owner's alone, like the image.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _cleanup = Remove(vec![path.clone(), dir.join(PID_FILE)]);
    sock::listen(&l, 1).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(PID_FILE), std::process::id().to_string())
        .map_err(|e| format!("{PID_FILE}: {e}"))?;
    let _ = sock::send_with_fd(&from, &[1], None);
    drop(from);
    let pidfds: Vec<OwnedFd> = fds
        .iter()
        .filter_map(|(p, _)| crate::sys::pidfd_open(nix::unistd::Pid::from_raw(*p)).ok())
        .collect();
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(());
        }
        // Every tracked process gone: nothing to keep.
        let alive = pidfds
            .iter()
            .any(|p| !crate::sys::inet::poll(p, libc::POLLIN, 0).unwrap_or(true));
        if !alive {
            return Ok(());
        }
        let ms = left.as_millis().min(500) as i32;
        if !crate::sys::inet::poll(&l, libc::POLLIN, ms).map_err(|e| e.to_string())? {
            continue;
        }
        let c = sock::accept(&l).map_err(|e| e.to_string())?;
        // Only the owner of the image (root, or the same user) may take it.
        let creds = nix::sys::socket::getsockopt(&c, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(|e| e.to_string())?;
        if creds.uid() != 0 && creds.uid() != nix::unistd::geteuid().as_raw() {
            continue;
        }
        return send_all(&c, &fds).map_err(|e| format!("handing the tracking over: {e}"));
    }
}

/// The files a holder removes when it ends.
struct Remove(Vec<PathBuf>);

impl Drop for Remove {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The userfaultfds the holder of image directory `dir` keeps, by pid
/// (taken: it ends); empty when there is none (it ended, or the image
/// was made without one).
pub fn take(dir: &Path) -> HashMap<i32, OwnedFd> {
    let path = dir.join(SOCKET);
    let got = (|| -> std::io::Result<Vec<(i32, OwnedFd)>> {
        let s = sock::unix_socket(libc::SOCK_SEQPACKET)?;
        let addr = sock::UnixAddr::new(path.as_os_str().as_encoded_bytes())
            .ok_or_else(|| std::io::Error::other("a path too long for a socket"))?;
        sock::connect(&s, &addr)?;
        recv_all(&s)
    })();
    match got {
        Ok(fds) => fds.into_iter().collect(),
        Err(e) => {
            tracing::info!("no dirty tracking from {}: {e}", path.display());
            HashMap::new()
        }
    }
}
