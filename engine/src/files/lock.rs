//! File locks and the signal owner of open files.
//!
//! Dump: the `lock:` lines of /proc/PID/fdinfo/N (flock, POSIX, OFD locks
//! and leases; the kernel shows a process's POSIX locks and the others of
//! that open file description), and F_GETOWN_EX / F_GETSIG through a
//! duplicate of the descriptor. Restore: flock, OFD locks and leases
//! belong to the open file description and are taken by cryo once it has
//! opened it; POSIX locks belong to the process and are taken by the task
//! once its descriptors are in place, like the owner, which names a task
//! that must exist by then.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, RawFd};

use cryo_image::proto::{FileLock, FileOwner};

use super::{FdCtx, FilesError, ProcHandles};
use crate::sys;

/// Parse one `lock:` line of fdinfo (`1: POSIX  ADVISORY  WRITE 7988
/// fe:00:123 0 99`, `... 0 EOF`).
fn parse_lock(v: &str) -> Option<FileLock> {
    let mut it = v.split_whitespace();
    it.next()?; // "1:"
    let kind = it.next()?.to_string();
    it.next()?; // ADVISORY, MANDATORY, ACTIVE, BREAKING, BREAKER
    let write = match it.next()? {
        "WRITE" => true,
        "READ" => false,
        _ => return None, // UNLCK: a lease being broken
    };
    it.next()?; // pid
    it.next()?; // dev:inode
    let start = it.next()?.parse().ok()?;
    let end = match it.next()? {
        "EOF" => u64::MAX,
        e => e.parse().ok()?,
    };
    Some(FileLock {
        kind,
        write,
        start,
        end,
    })
}

/// The locks fdinfo shows for the descriptor: (the open file
/// description's, the process's POSIX ones). Unknown kinds are refused.
pub fn dump_locks(cx: &FdCtx) -> Result<(Vec<FileLock>, Vec<FileLock>), FilesError> {
    let mut own = Vec::new();
    let mut posix = Vec::new();
    for line in cx.fdinfo.lines() {
        let Some(v) = line.strip_prefix("lock:") else {
            continue;
        };
        let l = parse_lock(v).ok_or_else(|| cx.bad())?;
        match l.kind.as_str() {
            "POSIX" => posix.push(l),
            "FLOCK" | "OFDLCK" | "LEASE" => own.push(l),
            _ => {
                return Err(cx.unsupported(
                    "a file lock of a kind cryo does not know (not FLOCK, POSIX, OFDLCK or LEASE)",
                ))
            }
        }
    }
    Ok((own, posix))
}

/// F_GETOWN_EX and F_GETSIG of the descriptor (None: neither set).
pub fn dump_owner(cx: &FdCtx, h: &mut ProcHandles) -> Result<Option<FileOwner>, FilesError> {
    let fd = h.getfd(cx.pid, cx.fd)?;
    let (kind, pid) = sys::fs::get_owner(fd.as_raw_fd()).map_err(|e| FilesError::Proc {
        path: format!("{} (F_GETOWN_EX)", cx.link),
        source: e.into(),
    })?;
    let signal = sys::fs::get_sig(fd.as_raw_fd()).unwrap_or(0);
    if pid == 0 && signal == 0 {
        return Ok(None);
    }
    Ok(Some(FileOwner {
        r#type: kind,
        pid,
        signal,
    }))
}

fn os(what: String) -> impl FnOnce(nix::errno::Errno) -> String {
    move |e| format!("{what}: {}", std::io::Error::from(e))
}

/// Take the open file description's locks again (in cryo, right after it
/// opened it).
pub fn take_own(fd: &impl AsFd, locks: &[FileLock]) -> Result<(), String> {
    let raw = fd.as_fd().as_raw_fd();
    for l in locks {
        let what = format!(
            "taking its {} {} lock on bytes {}-{}",
            l.kind,
            if l.write { "write" } else { "read" },
            l.start,
            l.end
        );
        match l.kind.as_str() {
            "FLOCK" => sys::fs::flock(raw, l.write).map_err(os(what))?,
            "OFDLCK" => sys::fs::set_lock(raw, true, l.write, l.start, l.end).map_err(os(what))?,
            "LEASE" => sys::fs::set_lease(raw, l.write).map_err(os(what))?,
            _ => return Err(format!("a lock of kind {} on it", l.kind)),
        }
    }
    Ok(())
}

/// In the task, its descriptor `fd` in place: its POSIX locks.
pub fn take_posix(fd: RawFd, locks: &[FileLock]) -> Result<(), String> {
    for l in locks {
        let what = format!(
            "fd {fd}: taking its POSIX {} lock on bytes {}-{}",
            if l.write { "write" } else { "read" },
            l.start,
            l.end
        );
        sys::fs::set_lock(fd, false, l.write, l.start, l.end).map_err(os(what))?;
    }
    Ok(())
}

/// In the task, every task of the tree in place: the descriptor's owner
/// and signal.
/// `pids`: the tree's pids as the task sees them.
pub fn set_owner(fd: RawFd, o: &FileOwner, pids: crate::ns::pid::View) -> Result<(), String> {
    if o.pid != 0 {
        let pid = pids
            .pid(o.pid.unsigned_abs())
            .map_err(|e| format!("fd {fd}: its owner: {e}"))?;
        sys::fs::set_owner(fd, o.r#type, pid as i32 * o.pid.signum())
            .map_err(os(format!("fd {fd}: F_SETOWN_EX to {} {pid}", o.r#type)))?;
    }
    if o.signal != 0 {
        sys::fs::set_sig(fd, o.signal).map_err(os(format!("fd {fd}: F_SETSIG {}", o.signal)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines() {
        let l = parse_lock("\t1: POSIX  ADVISORY  WRITE 7988 fe:00:10011094 0 99").unwrap();
        assert_eq!(
            (l.kind.as_str(), l.write, l.start, l.end),
            ("POSIX", true, 0, 99)
        );
        let l = parse_lock("\t1: FLOCK  ADVISORY  READ 7988 fe:00:1 0 EOF").unwrap();
        assert_eq!(
            (l.kind.as_str(), l.write, l.end),
            ("FLOCK", false, u64::MAX)
        );
        let l = parse_lock("\t1: OFDLCK ADVISORY  READ -1 fe:00:10011095 10 19").unwrap();
        assert_eq!((l.start, l.end), (10, 19));
        assert!(parse_lock("\t1: LEASE  BREAKING  UNLCK 1 fe:00:1 0 EOF").is_none());
    }
}
