//! The descriptor table of a new task, built number by number before it
//! hands over to the restorer: cryo's own descriptors (the status pipe)
//! move above every dumped number, everything else it inherited is
//! closed, then each dumped number becomes a duplicate of the open file
//! description cryo made for it (so descriptors that shared one at the
//! dump share it again); epolls and pidfds are made by the task itself,
//! pidfds first, then epolls, whose targets are all in place by then.

#![forbid(unsafe_code)]

use crate::ns::pid::{PidMap, View};
use std::collections::HashMap;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::Ordering;

use cryo_image::proto::{FdEntry, FileEntry, FileKind};

use super::image::Image;
use super::status::STATUS_FD;
use crate::files;
use crate::sys::fd;

fn os(what: String) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The file of `e` if the task makes it itself.
fn own_file<'a>(img: &'a Image, e: &FdEntry) -> Option<&'a FileEntry> {
    img.files
        .iter()
        .find(|f| f.id == e.id)
        .filter(|f| FileKind::try_from(f.kind).is_ok_and(files::made_by_task))
}

/// Build the task's descriptor table from the open file descriptions cryo
/// made (`made`, by file id, inherited); `status_w` is the status pipe,
/// moved above the dumped numbers, like the task's own descriptors in
/// `extra` (their numbers are updated). Returns the status pipe's new
/// number. `shared_floor`: the table is shared with other tasks, whose
/// own descriptors are at this number and above (left alone; everything
/// of this task's lands there too).
pub fn install(
    img: &Image,
    pids: &PidMap,
    made: &HashMap<u32, RawFd>,
    status_w: RawFd,
    extra: &mut [RawFd],
    shared_floor: Option<RawFd>,
) -> Result<RawFd, String> {
    let max_fd = img
        .fds
        .iter()
        .map(|f| f.fd as i32)
        .max()
        .unwrap_or(2)
        .max(2);
    let high = shared_floor.unwrap_or(0).max(max_fd + 1);
    let mut keep: Vec<RawFd> = Vec::new();
    let mut dup_high = |from: RawFd| -> Result<RawFd, String> {
        let n = fd::dup_at_least(from, high + keep.len() as i32)
            .map_err(os("moving a descriptor".into()))?;
        keep.push(n);
        Ok(n)
    };
    let status_fd = dup_high(status_w)?;
    STATUS_FD.store(status_fd, Ordering::Relaxed);
    fd::close(status_w);
    for n in extra.iter_mut() {
        let moved = dup_high(*n)?;
        fd::close(*n);
        *n = moved;
    }
    // The open file descriptions this task uses move into the kept block.
    let mut moved: Vec<(u32, RawFd)> = Vec::new();
    for e in &img.fds {
        if moved.iter().any(|m| m.0 == e.id) || own_file(img, e).is_some() {
            continue;
        }
        let src = *made
            .get(&e.id)
            .ok_or_else(|| format!("fd {}: no open file {} was made for it", e.fd, e.id))?;
        moved.push((e.id, dup_high(src)?));
    }
    if shared_floor.is_some() {
        fd::close_range(0, (high - 1) as u32).map_err(os("close_range".into()))?;
    } else {
        close_others(&keep, high)?;
    }
    for e in img.fds.iter().filter(|e| own_file(img, e).is_none()) {
        let src = moved
            .iter()
            .find(|m| m.0 == e.id)
            .map(|m| m.1)
            .ok_or("fd without file")?;
        // It shares the open file description (offset, flags) with every
        // other user of it.
        fd::dup_onto(src, e.fd as RawFd, e.cloexec).map_err(os(format!("fd {}: dup3", e.fd)))?;
    }
    for (_, n) in moved {
        fd::close(n);
    }
    let view = pids.view_of(&img.pstree);
    make_own(img, view)?;
    // What names the process or other tasks: they all exist by now.
    for e in &img.fds {
        files::lock::take_posix(e.fd as RawFd, &e.posix_locks)?;
        let owner = img
            .files
            .iter()
            .find(|f| f.id == e.id)
            .and_then(|f| f.owner.as_ref());
        if let Some(o) = owner {
            files::lock::set_owner(e.fd as RawFd, o, view)?;
        }
    }
    Ok(status_fd)
}

/// Close every descriptor but the kept block (cryo's copies landed
/// around it, among inherited ones).
fn close_others(keep: &[RawFd], high: RawFd) -> Result<(), String> {
    let lo = *keep.iter().min().unwrap_or(&high);
    let hi = *keep.iter().max().unwrap_or(&high);
    fd::close_range(0, (lo - 1) as u32).map_err(os("close_range".into()))?;
    fd::close_range((hi + 1) as u32, u32::MAX).map_err(os("close_range".into()))?;
    for n in lo..=hi {
        if !keep.contains(&n) {
            fd::close(n);
        }
    }
    Ok(())
}

/// pidfds, then epolls (their targets are all in place by now), each
/// moved onto its dumped number.
fn make_own(img: &Image, view: View) -> Result<(), String> {
    let mut own: Vec<(&FdEntry, &FileEntry)> = img
        .fds
        .iter()
        .filter_map(|e| own_file(img, e).map(|f| (e, f)))
        .collect();
    own.sort_by_key(|(e, f)| (f.kind == FileKind::FileEpoll as i32, e.fd));
    for (e, f) in own {
        let target = e.fd as RawFd;
        let made = files::make_in_task(f, view).map_err(|m| format!("fd {}: {m}", e.fd))?;
        let tmp = made.into_raw_fd();
        if tmp != target {
            fd::dup_onto(tmp, target, e.cloexec).map_err(os(format!("fd {}: dup3", e.fd)))?;
            fd::close(tmp);
        } else if !e.cloexec {
            let _ = fd::set_cloexec(tmp, false);
        }
        let _ = fd::set_status_flags(target, f.flags as i32 & (libc::O_NONBLOCK | libc::O_APPEND));
        files::finish_in_task(f, target).map_err(|m| format!("fd {}: {m}", e.fd))?;
    }
    Ok(())
}
