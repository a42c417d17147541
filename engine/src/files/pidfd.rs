//! pidfd: the process it refers to.
//!
//! Dump: fdinfo's `Pid` (0 when it is outside cryo's pid namespace:
//! refused; -1 once the process has exited and been reaped: a
//! FILE_PIDFD_DEAD). Restore: made by the task that holds it, once every
//! task of the tree exists (pidfd_open of the same pid); a pidfd of a
//! reaped process is one of a child of cryo's, reaped at once.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::FileEntry;
use nix::unistd::Pid;

use super::{FdCtx, FilesError};

pub fn dump(cx: &FdCtx, e: &mut FileEntry) -> Result<(), FilesError> {
    match cx.int("Pid").ok_or_else(|| cx.bad())? {
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
/// any task opens its descriptors), opened by its pid as the holder sees
/// it (`pids`).
pub fn make(f: &FileEntry, pids: crate::ns::pid::View) -> Result<OwnedFd, String> {
    let pid = pids
        .pid(f.pidfd_pid)
        .map_err(|e| format!("making its {}: {e}", f.path))?;
    crate::sys::pidfd_open(Pid::from_raw(pid as i32))
        .map_err(|e| format!("making its {}: {}", f.path, std::io::Error::from(e.errno)))
}

/// A pidfd whose process has exited and been reaped: what polling it and
/// waitid(P_PIDFD) report is the exit, as for the dumped one.
pub fn make_dead() -> Result<OwnedFd, String> {
    crate::sys::proc::reaped_child_pidfd().map_err(|e| {
        format!(
            "making a pidfd of a reaped process: {}",
            std::io::Error::from(e)
        )
    })
}
