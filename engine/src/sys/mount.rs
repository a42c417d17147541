//! The new mount API calls nix does not wrap: a detached copy of one
//! mount (open_tree OPEN_TREE_CLONE), attaching it (move_mount), and
//! joining another mount's peer group (move_mount MOVE_MOUNT_SET_GROUP).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_SET_GROUP: libc::c_uint = 0x100;

fn cpath(p: &str) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

/// A detached copy of the mount at `path` (that mount alone, showing the
/// directory at `path`), as a descriptor; it goes when the descriptor
/// closes unless [`attach`] puts it somewhere.
pub fn clone_mount(path: &str) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree reads the NUL-terminated path, which lives across
    // the call, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, p.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// move_mount(2) from `from` (a path, or with `from_fd` the mount that
/// descriptor is, the path empty) to the path `to`.
fn move_mount(from_fd: Option<i32>, from: &str, to: &str, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    let (dfd, flags) = match from_fd {
        Some(fd) => (fd, flags | MOVE_MOUNT_F_EMPTY_PATH),
        None => (libc::AT_FDCWD, flags),
    };
    // SAFETY: move_mount reads two NUL-terminated paths that outlive the
    // call; it changes only the mount tree or propagation.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            dfd,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mount the detached mount `m` (see [`clone_mount`]) at `target`.
pub fn attach(m: &impl AsFd, target: &str) -> io::Result<()> {
    move_mount(Some(m.as_fd().as_raw_fd()), "", target, 0)
}

/// Make the private mount at `to` a member of the peer group of the
/// mount at `from` (and a slave of its master, if it has one): both of
/// one filesystem, `from`'s root at or above `to`'s.
pub fn set_group(from: &str, to: &str) -> io::Result<()> {
    move_mount(None, from, to, MOVE_MOUNT_SET_GROUP)
}
