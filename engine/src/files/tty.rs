//! Terminals other than the tree's own pty pairs: the controlling
//! terminal of a shell job (--shell-job), and the refusal of any other.
//!
//! Dump: a character device that is a terminal (tty major 4, /dev/tty,
//! /dev/console, a pty) is accepted only as a pty of the tree (see
//! [`super::pty`]) or as the controlling terminal of a --shell-job.
//! Restore: a shell job's terminal is the terminal of the session cryo
//! restores from.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{FileEntry, FileKind};
use nix::fcntl::OFlag;

use super::{FdCtx, FilesError};
use crate::sys;

/// Whether a character device number is a terminal (a tty of major 4,
/// /dev/tty, /dev/console, /dev/ptmx, or a pty slave).
fn is_terminal(rdev: u64) -> bool {
    let major = libc::major(rdev);
    let minor = libc::minor(rdev);
    matches!(major, 4 | 136..=143) || (major == 5 && minor <= 2)
}

/// The kind of a character device descriptor (`ctty`: the process's
/// controlling terminal).
pub fn classify_chardev(cx: &FdCtx, ctty: u64, shell_job: bool) -> Result<FileKind, FilesError> {
    let rdev = cx.st.st_rdev;
    // Pty pairs: whether the master of a slave is in the tree is decided
    // once every process is collected (pty::pair).
    if rdev == sys::tty::ptmx_rdev() {
        return Ok(FileKind::FilePtyMaster);
    }
    if sys::tty::pty_slave_index(rdev).is_some() {
        return Ok(FileKind::FilePtySlave);
    }
    if !is_terminal(rdev) {
        return Ok(FileKind::FileChardev);
    }
    // Other terminals carry a session and job control: only the
    // controlling one of a --shell-job is accepted.
    if shell_job && rdev == ctty {
        return Ok(FileKind::FileShellTty);
    }
    Err(FilesError::UnsupportedFd {
        pid: cx.pid,
        fd: cx.fd,
        what: if rdev == ctty {
            "its controlling terminal (a shell job: dump it with --shell-job)"
        } else {
            "a terminal other than its controlling one (only pty pairs of the tree and a --shell-job's terminal are supported)"
        },
        link: cx.link.to_string(),
    })
}

/// The device path of this session's controlling terminal: one of our
/// descriptors 0-2 on it (the usual case for cryo started from a shell),
/// else /dev/tty.
fn controlling_tty_path() -> String {
    let Some(st) = crate::pstree::stat(std::process::id() as i32) else {
        return "/dev/tty".into();
    };
    let ctty = st.ctty();
    for fd in 0..3 {
        let link = format!("/proc/self/fd/{fd}");
        let Ok(md) = std::fs::metadata(&link) else {
            continue;
        };
        if st.tty_nr != 0 && std::os::unix::fs::MetadataExt::rdev(&md) == ctty {
            if let Ok(p) = std::fs::read_link(&link) {
                return p.display().to_string();
            }
        }
    }
    "/dev/tty".into()
}

/// The terminal of the restoring session, for a shell job's descriptor.
pub fn open_shell_tty(f: &FileEntry) -> Result<OwnedFd, String> {
    let flags = OFlag::from_bits_truncate(
        f.flags as i32 & (libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_APPEND),
    );
    nix::fcntl::open(
        controlling_tty_path().as_str(),
        flags | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "the task had its shell's terminal open (a --shell-job dump): restore it from a terminal (/dev/tty: {})",
            std::io::Error::from(e)
        )
    })
}
