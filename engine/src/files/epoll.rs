//! epoll: the descriptors it watches, with their events and data words.
//!
//! Dump: fdinfo's `tfd:` lines; every watched descriptor must still be
//! the file it was added as (its number is what restore re-adds).
//! Restore: made by the task that holds it, after its other descriptors
//! are at their numbers, and every target added again.

#![forbid(unsafe_code)]

use std::os::fd::{OwnedFd, RawFd};

use cryo_image::proto::{EpollState, EpollTarget, FileEntry};

use super::{FdCtx, FilesError};
use crate::proc as procfmt;

pub fn dump(cx: &FdCtx, e: &mut FileEntry) -> Result<(), FilesError> {
    let targets = procfmt::parse_epoll_targets(cx.fdinfo).map_err(|line| {
        tracing::warn!(pid = cx.pid, fd = cx.fd, "unreadable epoll target: {line}");
        cx.bad()
    })?;
    for &(tfd, _, _, ino) in &targets {
        let target = std::fs::metadata(format!("/proc/{}/fd/{tfd}", cx.pid))
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        if target != Some(ino) {
            return Err(FilesError::UnsupportedFd {
                pid: cx.pid,
                fd: cx.fd,
                what: "an epoll watching a file whose descriptor was closed or reused (not supported yet)",
                link: format!("{} (target fd {tfd})", e.path),
            });
        }
    }
    e.epoll = Some(EpollState {
        targets: targets
            .iter()
            .map(|&(tfd, events, data, _)| EpollTarget { tfd, events, data })
            .collect(),
    });
    Ok(())
}

/// A new, empty epoll instance.
pub fn make(f: &FileEntry) -> Result<OwnedFd, String> {
    crate::sys::fd::epoll_create().map_err(|e| format!("making its {}: {e}", f.path))
}

/// Watch every dumped target again from the epoll at number `fd`.
pub fn add_targets(f: &FileEntry, fd: RawFd) -> Result<(), String> {
    for t in f.epoll.iter().flat_map(|s| s.targets.iter()) {
        crate::sys::fd::epoll_add(fd, t.tfd as RawFd, t.events, t.data)
            .map_err(|e| format!("watching fd {} again (events {:#x}): {e}", t.tfd, t.events))?;
    }
    Ok(())
}
