//! signalfd: the signal mask it reads.
//!
//! Dump: fdinfo's `sigmask` (hexadecimal). Restore: a new signalfd for
//! that mask (realtime signals included).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{FileEntry, SignalfdState};

use super::{FdCtx, FilesError};

pub fn dump(cx: &FdCtx, e: &mut FileEntry) -> Result<(), FilesError> {
    let mask = cx.hex("sigmask").ok_or_else(|| cx.bad())?;
    e.signalfd = Some(SignalfdState { mask });
    Ok(())
}

/// A signalfd for its mask.
pub fn make(f: &FileEntry) -> Result<OwnedFd, String> {
    let st = f.signalfd.unwrap_or_default();
    crate::sys::fs::signalfd(st.mask).map_err(|e| format!("signalfd: {e}"))
}
