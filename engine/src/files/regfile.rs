//! Regular files, directories and character devices opened by path, and
//! O_PATH descriptors of symbolic links.
//!
//! Dump: the path, flags, offset, device and inode come from
//! /proc/PID/fd and fdinfo (see [`super::collect`]); of a symbolic link,
//! also its target. Restore: the path is opened again with the dumped
//! flags (never creating or truncating it) and the offset is put back; a
//! symbolic link is opened again (O_PATH | O_NOFOLLOW) only if it still
//! points where it did.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{FileEntry, FileKind};

use super::{FdCtx, FilesError, ProcHandles};
use nix::fcntl::OFlag;
use nix::unistd::Whence;

/// A regular file, directory or character device, opened by its path
/// with its flags and put at its offset.
pub fn open(f: &FileEntry, kind: FileKind) -> Result<OwnedFd, String> {
    let mut flags = super::open_flags(f);
    if kind == FileKind::FileDirectory {
        flags |= OFlag::O_DIRECTORY;
    }
    let fd = nix::fcntl::open(
        f.path.as_str(),
        flags | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening it: {}", std::io::Error::from(e)))?;
    let o_path = flags.contains(OFlag::O_PATH);
    if kind == FileKind::FileRegular && !o_path {
        nix::unistd::lseek(&fd, f.pos as i64, Whence::SeekSet)
            .map_err(|e| format!("seeking to {}: {}", f.pos, std::io::Error::from(e)))?;
    }
    Ok(fd)
}

/// What the symbolic link behind an O_PATH descriptor points to
/// (readlinkat on a duplicate of the descriptor).
pub fn dump_symlink(cx: &FdCtx, h: &mut ProcHandles, e: &mut FileEntry) -> Result<(), FilesError> {
    let fd = h.getfd(cx.pid, cx.fd)?;
    let target = nix::fcntl::readlinkat(&fd, "").map_err(|err| FilesError::Proc {
        path: format!(
            "{} (the target of fd {} of task {})",
            cx.link, cx.fd, cx.pid
        ),
        source: err.into(),
    })?;
    e.symlink_target = target.to_string_lossy().into_owned();
    Ok(())
}

/// The symbolic link at the entry's path, as an O_PATH descriptor, if it
/// still points to the dumped target.
pub fn open_symlink(f: &FileEntry) -> Result<OwnedFd, String> {
    let fd = nix::fcntl::open(
        f.path.as_str(),
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening the symbolic link: {}", std::io::Error::from(e)))?;
    let now = nix::fcntl::readlinkat(&fd, "")
        .map_err(|e| format!("it is no symbolic link now ({})", std::io::Error::from(e)))?;
    if now.to_string_lossy() != f.symlink_target {
        return Err(format!(
            "the symbolic link points to {} now, not to {} as at the dump",
            now.to_string_lossy(),
            f.symlink_target
        ));
    }
    Ok(fd)
}
