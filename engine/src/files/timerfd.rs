//! timerfd: its clock, the time left, the period and the expirations not
//! read yet.
//!
//! Dump: fdinfo's `clockid`, `ticks`, `it_value` and `it_interval`.
//! Restore: a new timerfd on that clock, armed with the time that was
//! left, and its unread expirations put back (TFD_IOC_SET_TICKS).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{FileEntry, TimerfdState};

use super::{FdCtx, FilesError};
use crate::proc as procfmt;
use crate::sys::fs;

pub fn dump(cx: &FdCtx, e: &mut FileEntry) -> Result<(), FilesError> {
    let st = (|| {
        Some(TimerfdState {
            clock_id: cx.num("clockid")? as i32,
            value_ns: procfmt::parse_timespec_pair(cx.info.get("it_value")?)?,
            interval_ns: procfmt::parse_timespec_pair(cx.info.get("it_interval")?)?,
            ticks: cx.num("ticks")?,
        })
    })();
    e.timerfd = Some(st.ok_or_else(|| cx.bad())?);
    Ok(())
}

/// A timerfd on its clock, armed with the time that was left and its
/// period, with its unread expirations.
pub fn make(f: &FileEntry) -> Result<OwnedFd, String> {
    let st = f.timerfd.unwrap_or_default();
    // A timer about to expire at the dump expires right away.
    let value = if st.value_ns == 0 && st.interval_ns == 0 {
        0
    } else {
        st.value_ns.max(1)
    };
    let fd = fs::timerfd_create(st.clock_id)
        .map_err(|e| format!("timerfd_create (clock {}): {e}", st.clock_id))?;
    fs::timerfd_settime(&fd, value, st.interval_ns).map_err(|e| format!("timerfd_settime: {e}"))?;
    if st.ticks > 0 {
        fs::timerfd_set_ticks(&fd, st.ticks)
            .map_err(|e| format!("restoring {} unread expirations: {e}", st.ticks))?;
    }
    Ok(fd)
}
