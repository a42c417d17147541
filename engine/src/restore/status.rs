//! The status pipe between the new tasks of a restore and cryo: each
//! record is one [`RStatus`] (atomic, under PIPE_BUF), a failure from
//! cryo's code in a task carries its message after it; and the barrier
//! pipes the tasks wait on.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use cryo_parasite::*;
use nix::errno::Errno;

use super::RestoreError;
use crate::sys::fd::borrow;

/// Where the new task reports errors (the status pipe moves during setup).
pub static STATUS_FD: AtomicI32 = AtomicI32::new(-1);

/// What never returns: the new tasks' setup ends in the restorer or exit.
pub enum Never {}

pub fn stage_name(stage: u32) -> &'static str {
    match stage {
        STAGE_RSEQ_UNREGISTER => "dropping cryo's own rseq registration",
        STAGE_UNMAP => "unmapping cryo's memory",
        STAGE_VDSO => "moving the vdso",
        STAGE_MREMAP => "moving a mapping to its address",
        STAGE_MAP_SHARED => "mapping a shared file",
        STAGE_MPROTECT => "setting a mapping's protection",
        STAGE_MM_MAP => "PR_SET_MM_MAP (mm fields and exe link)",
        STAGE_THREAD_STATE => "per-thread state",
        STAGE_RSEQ => "registering rseq",
        STAGE_SIGACTION => "signal actions",
        STAGE_TIMERS => "POSIX timers",
        STAGE_SIGNALS => "queueing pending signals",
        STAGE_RLIMIT => "resource limits (raising a hard limit needs CAP_SYS_RESOURCE)",
        STAGE_CREDS => "credentials",
        STAGE_ITIMER => "interval timers",
        STAGE_MADVISE => "madvise flags",
        STAGE_CLONE_THREAD => "creating a thread with its tid (clone3 set_tid)",
        STAGE_THREAD => "a thread setting its own state",
        _ => "an unknown stage",
    }
}

/// One status record to the supervisor (atomic: under PIPE_BUF).
pub fn send_status(fd: RawFd, st: &RStatus) {
    let _ = nix::unistd::write(borrow(fd), crate::infect::as_bytes(st));
}

pub fn report(fd: RawFd, stage: u32, pid: i32) {
    let st = RStatus {
        stage,
        index: 0,
        err: 0,
        pid: pid as u32,
        _pad: 0,
    };
    send_status(fd, &st);
}

/// Send an error message from cryo's code in a new task and exit.
pub fn report_error_and_exit(pid: i32, msg: &str) -> ! {
    let fd = STATUS_FD.load(Ordering::Relaxed);
    let text = &msg.as_bytes()[..msg.len().min(3000)];
    let st = RStatus {
        stage: STAGE_CHILD_ERR,
        index: text.len() as u32,
        err: 0,
        pid: pid as u32,
        _pad: 0,
    };
    let mut m = crate::infect::as_bytes(&st).to_vec();
    m.extend_from_slice(text);
    // One write (atomic, under PIPE_BUF), then exit without running
    // cryo's destructors.
    let _ = nix::unistd::write(borrow(fd), &m);
    crate::sys::proc::exit_now(1)
}

/// Wait for a barrier: one byte from its pipe.
pub fn read_go(fd: RawFd) -> Result<(), String> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(borrow(fd), &mut b) {
            Ok(1) => return Ok(()),
            Err(Errno::EINTR) => {}
            _ => return Err("cryo went away while the tree was being built".into()),
        }
    }
}

/// The error a failure record of the status pipe reports: a message from
/// cryo's code in the task (`text`), or the restorer's stage and errno.
pub fn record_error(st: &RStatus, text: &[u8]) -> RestoreError {
    let pid = st.pid as i32;
    if st.stage == STAGE_CHILD_ERR {
        return RestoreError::Child {
            pid,
            message: String::from_utf8_lossy(text).into_owned(),
        };
    }
    RestoreError::Restorer {
        pid,
        stage: stage_name(st.stage).to_string(),
        index: st.index,
        errno: Errno::from_raw((-st.err) as i32),
    }
}
