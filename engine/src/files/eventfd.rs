//! eventfd: the counter and the semaphore mode.
//!
//! Dump: fdinfo's `eventfd-count` (hexadecimal: the kernel prints it with
//! `%16llx`) and `eventfd-semaphore` (decimal). Restore: a new
//! eventfd in the same mode, with the counter written back into it.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{EventfdState, FileEntry};
use nix::sys::eventfd::EfdFlags;

use super::{FdCtx, FilesError};

pub fn dump(cx: &FdCtx, e: &mut FileEntry) -> Result<(), FilesError> {
    let st = (|| {
        Some(EventfdState {
            count: cx.hex("eventfd-count")?,
            semaphore: cx.num("eventfd-semaphore").unwrap_or(0) != 0,
        })
    })();
    e.eventfd = Some(st.ok_or_else(|| cx.bad())?);
    Ok(())
}

/// An eventfd with its count and mode.
pub fn make(f: &FileEntry) -> Result<OwnedFd, String> {
    let st = f.eventfd.unwrap_or_default();
    let mut flags = EfdFlags::EFD_CLOEXEC;
    if st.semaphore {
        flags |= EfdFlags::EFD_SEMAPHORE;
    }
    let fd: OwnedFd = nix::sys::eventfd::EventFd::from_value_and_flags(0, flags)
        .map_err(|e| format!("eventfd: {}", std::io::Error::from(e)))?
        .into();
    if st.count > 0 {
        match nix::unistd::write(&fd, &st.count.to_ne_bytes()) {
            Ok(8) => {}
            Ok(_) => {
                return Err(format!(
                    "setting the eventfd count {}: short write",
                    st.count
                ))
            }
            Err(e) => {
                return Err(format!(
                    "setting the eventfd count {}: {}",
                    st.count,
                    std::io::Error::from(e)
                ))
            }
        }
    }
    Ok(fd)
}
