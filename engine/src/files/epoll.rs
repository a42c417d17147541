//! epoll: the descriptors it watches, with their events and data words.
//!
//! Dump: fdinfo's `tfd:` lines; kcmp (KCMP_EPOLL_TFD) tells whether the
//! number a target was added with still holds the watched file, or which
//! other descriptor of the process does (the program dup'ed it and closed
//! or reused the number); a file no descriptor holds any more is refused.
//! Restore: made by the task that holds it, after its other descriptors
//! are at their numbers, and every target added again with its number
//! (a moved file put there for the time it takes).

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
    let mut out = Vec::with_capacity(targets.len());
    for &(tfd, events, data, _) in &targets {
        let same =
            |fd: i32| crate::sys::kcmp_epoll_target(cx.pid, fd, cx.fd, tfd as i32).unwrap_or(false);
        let via_fd = if same(tfd as i32) {
            None
        } else {
            let found = procfmt::fd_numbers(cx.pid)
                .into_iter()
                .find(|&fd| fd != tfd as i32 && same(fd));
            match found {
                Some(fd) => Some(fd as u32),
                None => return Err(FilesError::UnsupportedFd {
                    pid: cx.pid,
                    fd: cx.fd,
                    what:
                        "an epoll watching a file that no descriptor of its process holds any more",
                    link: format!("{} (target added as fd {tfd})", e.path),
                }),
            }
        };
        out.push(EpollTarget {
            tfd,
            events,
            data,
            via_fd,
        });
    }
    e.epoll = Some(EpollState { targets: out });
    Ok(())
}

/// A new, empty epoll instance.
pub fn make(f: &FileEntry) -> Result<OwnedFd, String> {
    crate::sys::fd::epoll_create().map_err(|e| format!("making its {}: {e}", f.path))
}

/// Watch every dumped target again from the epoll at number `fd`. A
/// target whose file is at another number now goes to its number for the
/// time it is added; what that number holds (if anything) comes back.
pub fn add_targets(f: &FileEntry, fd: RawFd) -> Result<(), String> {
    use crate::sys::fd as sfd;
    for t in f.epoll.iter().flat_map(|s| s.targets.iter()) {
        let tfd = t.tfd as RawFd;
        let add = || {
            sfd::epoll_add(fd, tfd, t.events, t.data)
                .map_err(|e| format!("watching fd {tfd} again (events {:#x}): {e}", t.events))
        };
        let Some(via) = t.via_fd else {
            add()?;
            continue;
        };
        let err = |what: &'static str| move |e: std::io::Error| format!("fd {tfd}: {what}: {e}");
        // What the number holds now, kept aside.
        let held = match sfd::cloexec_of(tfd) {
            Some(cloexec) => Some((
                sfd::dup_at_least(tfd, 3).map_err(err("keeping it aside"))?,
                cloexec,
            )),
            None => None,
        };
        sfd::dup_onto(via as RawFd, tfd, true).map_err(err("putting the watched file there"))?;
        let added = add();
        match held {
            Some((aside, cloexec)) => {
                let back = sfd::dup_onto(aside, tfd, cloexec).map_err(err("putting it back"));
                sfd::close(aside);
                back?;
            }
            None => sfd::close(tfd),
        }
        added?;
    }
    Ok(())
}
