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

/// Mount the detached mount `m` (see [`clone_mount`]) at `target`.
pub fn attach(m: &impl AsFd, target: &str) -> io::Result<()> {
    let t = cpath(target)?;
    // SAFETY: move_mount reads two NUL-terminated paths (an empty one for
    // the source, which is the descriptor itself) that live across the
    // call; it changes only the mount tree.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            m.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make the private mount at `to` a member of the peer group of the
/// mount at `from` (and a slave of its master, if it has one): both of
/// one filesystem, `from`'s root at or above `to`'s.
pub fn set_group(from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: as in `attach`: two NUL-terminated paths that outlive the
    // call; only propagation settings change.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_SET_GROUP,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
