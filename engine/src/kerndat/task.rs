//! Probes of the task interfaces: ptrace (seize, interrupt, signal masks,
//! rseq, XSAVE), clone3 with set_tid, kcmp and pidfds.

#![forbid(unsafe_code)]

use super::*;

pub(super) struct PtraceProbes {
    pub(super) seize: Result<Outcome, KerndatError>,
    pub(super) sigmask: Result<Outcome, KerndatError>,
    pub(super) rseq_config: Result<Outcome, KerndatError>,
    pub(super) xstate: Result<Outcome, KerndatError>,
    pub(super) rseq: Result<Outcome, KerndatError>,
}

pub(super) fn not_probed() -> Result<Outcome, KerndatError> {
    Err(KerndatError::NotProbed {
        reason: "ptrace-seize failed",
    })
}

pub(super) fn probe_ptrace() -> PtraceProbes {
    let child = match spawn(sys::proc::fork_paused) {
        Ok(c) => c,
        Err(e) => {
            return PtraceProbes {
                seize: Err(e),
                sigmask: not_probed(),
                rseq_config: not_probed(),
                xstate: not_probed(),
                rseq: not_probed(),
            }
        }
    };
    let pid = child.pid();

    if let Err(e) = seize_and_interrupt(pid) {
        return PtraceProbes {
            seize: Err(e),
            sigmask: not_probed(),
            rseq_config: not_probed(),
            xstate: not_probed(),
            rseq: not_probed(),
        };
    }

    let sigmask = probe_getsigmask(pid);
    let (rseq_config, rseq) = probe_rseq_config(pid);
    let xstate = probe_xstate(pid);
    let seize = match ptrace::detach(pid, None) {
        Ok(()) => yes("seize, interrupt, event stop, detach"),
        Err(errno) => Err(KerndatError::Syscall {
            call: "PTRACE_DETACH",
            errno,
        }),
    };
    drop(child);
    PtraceProbes {
        seize,
        sigmask,
        rseq_config,
        xstate,
        rseq,
    }
}

pub(super) fn seize_and_interrupt(pid: Pid) -> Result<(), KerndatError> {
    ptrace::seize(pid, ptrace::Options::empty()).map_err(|errno| KerndatError::Syscall {
        call: "PTRACE_SEIZE",
        errno,
    })?;
    ptrace::interrupt(pid).map_err(|errno| KerndatError::Syscall {
        call: "PTRACE_INTERRUPT",
        errno,
    })?;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            Err(errno) => {
                return Err(KerndatError::Syscall {
                    call: "waitpid",
                    errno,
                })
            }
            Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_STOP => return Ok(()),
            Ok(other) => {
                return Err(KerndatError::Unexpected {
                    what: "wait status after PTRACE_INTERRUPT",
                    expected: "PTRACE_EVENT_STOP".into(),
                    found: format!("{other:?}"),
                })
            }
        }
    }
}

pub(super) fn probe_getsigmask(pid: Pid) -> Result<Outcome, KerndatError> {
    let mask = sys::get_sigmask(pid).map_err(task_err("PTRACE_GETSIGMASK"))?;
    yes(format!("blocked mask {mask:#x}"))
}

pub(super) fn probe_rseq_config(
    pid: Pid,
) -> (Result<Outcome, KerndatError>, Result<Outcome, KerndatError>) {
    let cfg = match sys::rseq_config(pid) {
        Ok(c) => c,
        Err(e) => {
            let rseq = Err(KerndatError::NotProbed {
                reason: "PTRACE_GET_RSEQ_CONFIGURATION failed",
            });
            return (Err(task_err("PTRACE_GET_RSEQ_CONFIGURATION")(e)), rseq);
        }
    };
    let detail = format!("ptr {:#x} len {} sig {:#x}", cfg.ptr, cfg.len, cfg.sig);
    let rseq = if cfg.ptr != 0 {
        yes(format!(
            "libc registered rseq: len {}, sig {:#x}",
            cfg.len, cfg.sig
        ))
    } else {
        no("no rseq registration in a forked child")
    };
    (yes(detail), rseq)
}

pub(super) fn probe_xstate(pid: Pid) -> Result<Outcome, KerndatError> {
    let buf = sys::get_xstate(pid).map_err(task_err("PTRACE_GETREGSET(NT_X86_XSTATE)"))?;
    let mut detail = format!("{} bytes", buf.len());
    // The kernel puts XCR0 in the software-reserved bytes at offset 464.
    if let Some(b) = buf.get(464..472) {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        let _ = write!(detail, ", xcr0 {:#x}", u64::from_ne_bytes(w));
    }
    yes(detail)
}

// ---------------------------------------------------------------------------
// clone3 with set_tid

pub(super) fn pid_max() -> i32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(32768)
}

pub(super) fn probe_clone3_set_tid() -> Result<Outcome, KerndatError> {
    let max = pid_max().max(1024);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as i64
        ^ i64::from(std::process::id());
    let half = i64::from(max / 2);
    let mut tried = 0;
    let mut last_err = None;
    for i in 0..32i64 {
        let want = (half + (seed + i * 7919).rem_euclid(half - 1)) as libc::pid_t;
        if Path::new(&format!("/proc/{want}")).exists() {
            continue;
        }
        tried += 1;
        if tried > 8 {
            break;
        }
        let ret = match sys::proc::clone3_exiting(want) {
            Ok(pid) => pid,
            Err(errno) if errno == Errno::EEXIST => {
                last_err = Some(sys_err("clone3(set_tid)")(errno));
                continue;
            }
            Err(errno) => return Err(sys_err("clone3(set_tid)")(errno)),
        };
        let child = Child {
            pid: Some(Pid::from_raw(ret)),
        };
        let status = child.wait()?;
        if ret != want {
            return no(format!("asked for pid {want}, got {ret}"));
        }
        return match status {
            WaitStatus::Exited(_, 0) => yes(format!("created pid {want} on request")),
            other => Err(KerndatError::Child {
                probe: "clone3-set-tid",
                pid: want,
                status: format!("{other:?}"),
            }),
        };
    }
    Err(last_err.unwrap_or(KerndatError::NotProbed {
        reason: "no free pid found to request",
    }))
}

// ---------------------------------------------------------------------------
// kcmp, pidfd

pub(super) fn open_dev_null() -> Result<File, KerndatError> {
    File::open("/dev/null").map_err(|e| io_err("/dev/null", e))
}

pub(super) fn kcmp_file(pid: libc::pid_t, fd1: RawFd, fd2: RawFd) -> Result<i64, KerndatError> {
    sys::kcmp_file_order(pid, pid, fd1, fd2).map_err(task_err("kcmp(KCMP_FILE)"))
}

pub(super) fn probe_kcmp() -> Result<Outcome, KerndatError> {
    let a = open_dev_null()?;
    let b = a.try_clone().map_err(|e| io_err("dup(/dev/null)", e))?;
    let c = open_dev_null()?;
    let pid = std::process::id() as libc::pid_t;
    let same = kcmp_file(pid, a.as_raw_fd(), b.as_raw_fd())?;
    let diff = kcmp_file(pid, a.as_raw_fd(), c.as_raw_fd())?;
    if same == 0 && diff != 0 {
        yes("dup'd fds equal, separate opens differ")
    } else {
        no(format!("unexpected order: dup {same}, separate {diff}"))
    }
}

pub(super) fn probe_pidfd() -> (Result<Outcome, KerndatError>, Result<Outcome, KerndatError>) {
    let pid = std::process::id() as libc::pid_t;
    let npid = Pid::from_raw(pid);
    let pidfd = match sys::pidfd_open(npid) {
        Ok(fd) => fd,
        Err(e) => {
            return (
                Err(task_err("pidfd_open")(e)),
                Err(KerndatError::NotProbed {
                    reason: "pidfd_open failed",
                }),
            )
        }
    };
    let getfd = match open_dev_null() {
        Err(e) => Err(e),
        Ok(target) => match sys::pidfd_getfd(&pidfd, npid, target.as_raw_fd()) {
            Err(e) => Err(task_err("pidfd_getfd")(e)),
            Ok(got) => match kcmp_file(pid, got.as_raw_fd(), target.as_raw_fd()) {
                Ok(0) => yes("copied an fd of self, same file description"),
                Ok(_) => yes("copied an fd of self"),
                Err(_) => yes("copied an fd of self (kcmp unavailable to verify)"),
            },
        },
    };
    (yes("pidfd of self"), getfd)
}

// ---------------------------------------------------------------------------
// userfaultfd
