//! Kernel feature probing for `cryo check`.
//!
//! Every probe exercises the feature for real on the running kernel (no
//! version checks). Probes are quick, and clean up after themselves: forked
//! children are killed and reaped, fds are closed, mappings unmapped,
//! namespaces are only created in short-lived children, and temporary cgroup
//! directories are removed.

#![forbid(unsafe_code)]

mod memory;
mod system;
mod task;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys::mem::AnonMap;
use crate::sys::{self, SysError};
use memory::*;
use system::*;
use task::*;

/// One probed kernel feature.
#[derive(Debug, Clone)]
pub struct Feature {
    /// Short stable name, e.g. `ptrace-seize`.
    pub name: &'static str,
    /// Whether the feature works on this kernel.
    pub present: bool,
    /// What the probe saw (sizes, masks, or the error).
    pub detail: String,
    /// What cryo loses without the feature.
    pub missing_cost: &'static str,
}

/// Why a probe could not confirm a feature. Only used to build
/// [`Feature::detail`]; `probe()` itself never fails.
#[derive(Debug, thiserror::Error)]
pub enum KerndatError {
    #[error("{call} failed: {errno}")]
    Syscall { call: &'static str, errno: Errno },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("probe child {pid} ({probe}) ended with {status}")]
    Child {
        probe: &'static str,
        pid: i32,
        status: String,
    },
    #[error("{what}: expected {expected}, found {found}")]
    Unexpected {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("not probed: {reason}")]
    NotProbed { reason: &'static str },
}

fn sys_err(call: &'static str) -> impl FnOnce(Errno) -> KerndatError {
    move |errno| KerndatError::Syscall { call, errno }
}

/// The same, for a wrapper that names the task.
fn task_err(call: &'static str) -> impl FnOnce(SysError) -> KerndatError {
    move |e| KerndatError::Syscall {
        call,
        errno: e.errno,
    }
}

fn io_err(path: impl Into<PathBuf>, source: std::io::Error) -> KerndatError {
    KerndatError::Io {
        path: path.into(),
        source,
    }
}

/// Result of one probe: present or not, plus a detail line.
struct Outcome {
    present: bool,
    detail: String,
}

fn yes(detail: impl Into<String>) -> Result<Outcome, KerndatError> {
    Ok(Outcome {
        present: true,
        detail: detail.into(),
    })
}

fn no(detail: impl Into<String>) -> Result<Outcome, KerndatError> {
    Ok(Outcome {
        present: false,
        detail: detail.into(),
    })
}

fn feature(
    name: &'static str,
    missing_cost: &'static str,
    r: Result<Outcome, KerndatError>,
) -> Feature {
    let (present, detail) = match r {
        Ok(o) => (o.present, o.detail),
        Err(e) => (false, e.to_string()),
    };
    Feature {
        name,
        present,
        detail,
        missing_cost,
    }
}

// Constants not (reliably) exported by libc.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const CAP_SYS_RESOURCE: u32 = 24;
const CLONE_NEWTIME: libc::c_int = 0x80;
const PAGE: usize = 4096;

/// Feature names in the order `probe()` reports them.
pub const FEATURE_NAMES: &[&str] = &[
    "ptrace-seize",
    "ptrace-getsigmask",
    "ptrace-rseq-config",
    "ptrace-xstate",
    "rseq",
    "clone3-set-tid",
    "kcmp",
    "pidfd-open",
    "pidfd-getfd",
    "userfaultfd",
    "uffd-wp-async",
    "pagemap-scan",
    "soft-dirty",
    "dirty-tracking",
    "memfd-create",
    "vmsplice",
    "cgroup-v2-freezer",
    "cgroup-v1-freezer",
    "ns-user",
    "ns-pid",
    "ns-net",
    "ns-mnt",
    "ns-uts",
    "ns-ipc",
    "ns-cgroup",
    "ns-time",
    "mount-api",
    "time-ns-offsets",
    "vdso-movable",
    "pr-set-mm-map",
    "timer-restore-ids",
    "cap-sys-resource",
];

/// Probe every feature cryo cares about on the running kernel.
pub fn probe() -> Vec<Feature> {
    let mut out = Vec::with_capacity(FEATURE_NAMES.len());

    let pt = probe_ptrace();
    out.push(feature(
        "ptrace-seize",
        "cannot seize or freeze tasks: no dump at all",
        pt.seize,
    ));
    out.push(feature(
        "ptrace-getsigmask",
        "cannot read a thread's blocked-signal mask from outside",
        pt.sigmask,
    ));
    out.push(feature(
        "ptrace-rseq-config",
        "cannot read rseq registrations: rseq state is lost on restore",
        pt.rseq_config,
    ));
    out.push(feature(
        "ptrace-xstate",
        "cannot save FPU/SSE/AVX registers: no dump at all",
        pt.xstate,
    ));
    out.push(feature(
        "rseq",
        "tasks do not use rseq here: nothing to save (informational)",
        pt.rseq,
    ));
    out.push(feature(
        "clone3-set-tid",
        "cannot create tasks with their original pids (racy ns_last_pid fallback)",
        probe_clone3_set_tid(),
    ));
    out.push(feature(
        "kcmp",
        "cannot tell shared file descriptions apart; shared files restore as separate opens",
        probe_kcmp(),
    ));
    let (pidfd_open, pidfd_getfd) = probe_pidfd();
    out.push(feature(
        "pidfd-open",
        "waiting on tasks falls back to plain waitpid",
        pidfd_open,
    ));
    out.push(feature(
        "pidfd-getfd",
        "fds must be passed out by the parasite over SCM_RIGHTS",
        pidfd_getfd,
    ));
    let (uffd, wp_async) = probe_userfaultfd();
    let async_ok = matches!(&wp_async, Ok(a) if a.present);
    out.push(feature(
        "userfaultfd",
        "dump -R stops the task for the copy of all its memory; no --pre-copy",
        uffd,
    ));
    out.push(feature(
        "uffd-wp-async",
        "no --pre-copy (its write tracking)",
        wp_async,
    ));
    let scan = probe_pagemap_scan();
    let tracks = async_ok && matches!(&scan, Ok(b) if b.present);
    out.push(feature(
        "pagemap-scan",
        "cryo cannot find the pages to dump (PAGEMAP_SCAN, Linux 6.7); no --pre-copy",
        scan,
    ));
    out.push(feature(
        "soft-dirty",
        "none: cryo tracks writes with userfaultfd write-protection instead",
        probe_soft_dirty(),
    ));
    // How pre-dump and dump --prev-images-dir tell the pages written
    // since the parent image.
    out.push(feature(
        "dirty-tracking",
        "an incremental dump (--prev-images-dir) stores every page",
        Ok(Outcome {
            present: tracks,
            detail: match tracks {
                true => "asynchronous userfaultfd write-protection read with PAGEMAP_SCAN, kept between commands by a holder process".into(),
                false => "none (needs uffd-wp-async and pagemap-scan)".into(),
            },
        }),
    ));
    out.push(feature(
        "memfd-create",
        "cannot restore memfd files or shared anonymous memory",
        probe_memfd(),
    ));
    out.push(feature(
        "vmsplice",
        "the parasite cannot hand pages to the dumper through pipes",
        probe_vmsplice(),
    ));
    let mounts = read_mountinfo();
    out.push(feature(
        "cgroup-v2-freezer",
        "--freeze-cgroup cannot use a cgroup v2 cgroup.freeze",
        probe_cgroup_v2_freezer(&mounts),
    ));
    out.push(feature(
        "cgroup-v1-freezer",
        "--freeze-cgroup cannot use a cgroup v1 freezer hierarchy",
        probe_cgroup_v1_freezer(&mounts),
    ));
    out.extend(probe_namespaces());
    out.push(feature(
        "mount-api",
        "cannot make a mount namespace of the tree's own again",
        probe_mount_api(),
    ));
    out.push(feature(
        "time-ns-offsets",
        "cannot restore time namespace clock offsets",
        probe_timens_offsets(),
    ));
    out.push(feature(
        "vdso-movable",
        "vdso is sealed: restore must proxy the dumped vdso instead of moving it",
        probe_vdso_movable(),
    ));
    out.push(feature(
        "pr-set-mm-map",
        "cannot restore mm fields (brk, args, env, auxv, exe) without CAP_SYS_RESOURCE",
        probe_pr_set_mm_map(),
    ));
    out.push(feature(
        "timer-restore-ids",
        "POSIX timer ids restored by create/delete cycling (slow for large ids)",
        probe_timer_restore_ids(),
    ));
    out.push(feature(
        "cap-sys-resource",
        "cannot raise hard rlimits or pipe sizes above fs.pipe-max-size; restore of a raised hard limit fails",
        probe_cap_sys_resource(),
    ));
    out
}

// ---------------------------------------------------------------------------
// Child processes

/// A forked child that is killed (if still running) and reaped on drop.
struct Child {
    pid: Option<Pid>,
}

impl Child {
    fn pid(&self) -> Pid {
        self.pid.unwrap_or(Pid::from_raw(0))
    }

    /// Wait for the child to exit and return its status; the child is
    /// reaped afterwards either way.
    fn wait(mut self) -> Result<WaitStatus, KerndatError> {
        let Some(pid) = self.pid.take() else {
            return Err(KerndatError::NotProbed {
                reason: "child already reaped",
            });
        };
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(KerndatError::Syscall {
                        call: "waitpid",
                        errno,
                    })
                }
                Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Ok(st),
                // Stops of an untraced child do not happen (no WUNTRACED);
                // keep waiting for the exit.
                Ok(_) => continue,
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = kill(pid, Signal::SIGKILL);
            loop {
                match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                    Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => break,
                    Err(Errno::EINTR) | Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }
}

/// A probe child forked by `fork` (one of the sys::proc wrappers).
fn spawn(fork: impl FnOnce() -> Result<Pid, Errno>) -> Result<Child, KerndatError> {
    let pid = fork().map_err(sys_err("fork"))?;
    Ok(Child { pid: Some(pid) })
}

fn errno_from_exit(status: &WaitStatus) -> Option<Errno> {
    match status {
        WaitStatus::Exited(_, code) if *code != 0 => Some(Errno::from_raw(*code)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// ptrace: seize, sigmask, rseq, xstate

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_every_feature() {
        let t = std::time::Instant::now();
        let features = probe();
        let elapsed = t.elapsed();
        let names: Vec<&str> = features.iter().map(|f| f.name).collect();
        assert_eq!(names, FEATURE_NAMES);
        for f in &features {
            eprintln!("{:<20} {:<5} {}", f.name, f.present, f.detail);
        }
        assert!(elapsed.as_secs_f64() < 1.0, "probe took {elapsed:?}");
        for must in ["ptrace-seize", "clone3-set-tid", "ns-pid"] {
            let f = features.iter().find(|f| f.name == must);
            assert!(
                f.is_some_and(|f| f.present),
                "{must} should be present here: {:?}",
                f.map(|f| &f.detail)
            );
        }
    }
}
