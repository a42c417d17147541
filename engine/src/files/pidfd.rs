//! pidfd: the process it refers to.
//!
//! Dump: fdinfo's `Pid` (-1 once the process has exited and been reaped,
//! 0 when it is outside cryo's pid namespace: both refused). Restore: made by the task that holds it, once
//! every task of the tree exists (pidfd_open of the same pid).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::FileEntry;
use nix::unistd::Pid;

use super::{FdCtx, FilesError};

pub fn dump(cx: &FdCtx, e: &mut FileEntry) -> Result<(), FilesError> {
    match cx.int("Pid").ok_or_else(|| cx.bad())? {
        -1 => Err(cx.unsupported("a pidfd of a process that has exited (not supported yet)")),
        pid if pid <= 0 => Err(
            cx.unsupported("a pidfd of a process outside cryo's pid namespace (not supported yet)")
        ),
        pid => {
            e.pidfd_pid = pid as u32;
            Ok(())
        }
    }
}

/// A pidfd of the dumped process (every task of the tree was made before
/// any task opens its descriptors).
pub fn make(f: &FileEntry) -> Result<OwnedFd, String> {
    crate::sys::pidfd_open(Pid::from_raw(f.pidfd_pid as i32))
        .map_err(|e| format!("making its {}: {}", f.path, std::io::Error::from(e.errno)))
}
