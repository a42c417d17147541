//! Regular files, directories and character devices opened by path.
//!
//! Dump: the path, flags, offset, device and inode come from
//! /proc/PID/fd and fdinfo (see [`super::collect`]); nothing else is
//! read. Restore: the path is opened again with the dumped flags (never
//! creating or truncating it) and the offset is put back.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{FileEntry, FileKind};
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
