//! Descriptors of POSIX message queues (mq_open).
//!
//! Dump: a regular file of the kernel's mqueue filesystem (statfs), its
//! link the queue's name; the queue itself, with its messages, belongs
//! to the task's IPC namespace (`ns::ipc`). Restore: the task opens the
//! name again (mq_open, with the access mode and O_NONBLOCK it had) once
//! its IPC namespace has its queues.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::FileEntry;

use super::FdCtx;

/// The mqueue filesystem's magic number (statfs f_type).
const MQUEUE_MAGIC: i64 = 0x1980_0202;

/// Whether the descriptor is a POSIX message queue's.
pub fn is_mqueue(cx: &FdCtx) -> bool {
    let path = format!("/proc/{}/fd/{}", cx.pid, cx.fd);
    nix::sys::statfs::statfs(path.as_str()).is_ok_and(|s| s.filesystem_type().0 == MQUEUE_MAGIC)
}

/// In the task: the queue `f.path` of its IPC namespace, opened again.
pub fn open(f: &FileEntry) -> Result<OwnedFd, String> {
    let keep = libc::O_ACCMODE | libc::O_NONBLOCK;
    crate::sys::ipc::mq_open(&f.path, f.flags as i32 & keep, None)
        .map_err(|e| format!("opening POSIX message queue {}: {e}", f.path))
}
