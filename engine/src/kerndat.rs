//! Kernel feature probing for `cryo check`.
//!
//! Every probe exercises the feature for real on the running kernel (no
//! version checks). Probes are quick, and clean up after themselves: forked
//! children are killed and reaped, fds are closed, mappings unmapped,
//! namespaces are only created in short-lived children, and temporary cgroup
//! directories are removed.

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
    out.push(feature(
        "pagemap-scan",
        "cryo cannot find the pages to dump (PAGEMAP_SCAN, Linux 6.7); no --pre-copy",
        probe_pagemap_scan(),
    ));
    out.push(feature(
        "soft-dirty",
        "none: cryo tracks writes with userfaultfd write-protection instead",
        probe_soft_dirty(),
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

struct PtraceProbes {
    seize: Result<Outcome, KerndatError>,
    sigmask: Result<Outcome, KerndatError>,
    rseq_config: Result<Outcome, KerndatError>,
    xstate: Result<Outcome, KerndatError>,
    rseq: Result<Outcome, KerndatError>,
}

fn not_probed() -> Result<Outcome, KerndatError> {
    Err(KerndatError::NotProbed {
        reason: "ptrace-seize failed",
    })
}

fn probe_ptrace() -> PtraceProbes {
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

fn seize_and_interrupt(pid: Pid) -> Result<(), KerndatError> {
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

fn probe_getsigmask(pid: Pid) -> Result<Outcome, KerndatError> {
    let mask = sys::get_sigmask(pid).map_err(task_err("PTRACE_GETSIGMASK"))?;
    yes(format!("blocked mask {mask:#x}"))
}

fn probe_rseq_config(pid: Pid) -> (Result<Outcome, KerndatError>, Result<Outcome, KerndatError>) {
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

fn probe_xstate(pid: Pid) -> Result<Outcome, KerndatError> {
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

fn pid_max() -> i32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(32768)
}

fn probe_clone3_set_tid() -> Result<Outcome, KerndatError> {
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

fn open_dev_null() -> Result<File, KerndatError> {
    File::open("/dev/null").map_err(|e| io_err("/dev/null", e))
}

fn kcmp_file(pid: libc::pid_t, fd1: RawFd, fd2: RawFd) -> Result<i64, KerndatError> {
    sys::kcmp_file_order(pid, pid, fd1, fd2).map_err(task_err("kcmp(KCMP_FILE)"))
}

fn probe_kcmp() -> Result<Outcome, KerndatError> {
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

fn probe_pidfd() -> (Result<Outcome, KerndatError>, Result<Outcome, KerndatError>) {
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

fn new_uffd() -> Result<OwnedFd, KerndatError> {
    sys::uffd::open(libc::O_CLOEXEC | sys::uffd::USER_MODE_ONLY)
        .map_err(sys_err("userfaultfd(UFFD_USER_MODE_ONLY)"))
}

/// The UFFDIO_API handshake asking for `features`; the supported ones.
fn uffdio_api(fd: &OwnedFd, features: u64) -> Result<u64, Errno> {
    sys::uffd::api(fd, nix::unistd::getpid(), features).map_err(|e| e.errno)
}

fn probe_userfaultfd() -> (Result<Outcome, KerndatError>, Result<Outcome, KerndatError>) {
    let fd = match new_uffd() {
        Ok(fd) => fd,
        Err(e) => {
            return (
                Err(e),
                Err(KerndatError::NotProbed {
                    reason: "userfaultfd failed",
                }),
            )
        }
    };
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    let wp = match uffdio_api(&fd, want) {
        Ok(features) => yes(format!("supported features {features:#x}")),
        Err(errno) => {
            // The API handshake happens once per fd: ask a fresh one for the
            // supported mask.
            let mask = new_uffd()
                .ok()
                .and_then(|f| uffdio_api(&f, 0).ok())
                .map(|f| format!(", supported features {f:#x}"))
                .unwrap_or_default();
            no(format!(
                "UFFDIO_API(WP_ASYNC|WP_UNPOPULATED): {errno}{mask}"
            ))
        }
    };
    (yes("user-mode-only uffd"), wp)
}

// ---------------------------------------------------------------------------
// Memory: PAGEMAP_SCAN, soft-dirty, memfd, vmsplice

fn map_pages(pages: usize) -> Result<AnonMap, KerndatError> {
    AnonMap::new(pages * PAGE).map_err(sys_err("mmap"))
}

fn probe_pagemap_scan() -> Result<Outcome, KerndatError> {
    let m = map_pages(4)?;
    m.touch(0, 1);
    m.touch(2 * PAGE, 1);
    let path = "/proc/self/pagemap";
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let q = sys::ScanQuery {
        mask: sys::PAGE_IS_PRESENT,
        anyof: sys::PAGE_IS_PRESENT,
        ret: sys::PAGE_IS_PRESENT,
        ..Default::default()
    };
    let regions = sys::pagemap_scan(&f, nix::unistd::getpid(), m.addr(), m.end(), &q)
        .map_err(task_err("ioctl(PAGEMAP_SCAN)"))?;
    yes(format!(
        "{} present region(s) for 2 touched of 4 pages",
        regions.len()
    ))
}

fn probe_soft_dirty() -> Result<Outcome, KerndatError> {
    let m = map_pages(1)?;
    m.touch(0, 1);
    let clear = "/proc/self/clear_refs";
    std::fs::write(clear, b"4").map_err(|e| io_err(clear, e))?;
    m.touch(0, 2);
    let path = "/proc/self/pagemap";
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut entry = [0u8; 8];
    f.read_exact_at(&mut entry, (m.addr() / PAGE as u64) * 8)
        .map_err(|e| io_err(path, e))?;
    let e = u64::from_ne_bytes(entry);
    if e & (1 << 63) == 0 {
        return no(format!("written page not present in pagemap ({e:#x})"));
    }
    if e & (1 << 55) != 0 {
        yes("bit 55 set after clear_refs + write")
    } else {
        no("bit 55 not set after clear_refs + write (no CONFIG_MEM_SOFT_DIRTY)")
    }
}

fn probe_memfd() -> Result<Outcome, KerndatError> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"cryo-check",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|errno| KerndatError::Syscall {
        call: "memfd_create",
        errno,
    })?;
    nix::unistd::ftruncate(&fd, PAGE as i64).map_err(|errno| KerndatError::Syscall {
        call: "ftruncate(memfd)",
        errno,
    })?;
    yes("memfd with sealing allowed")
}

fn probe_vmsplice() -> Result<Outcome, KerndatError> {
    let mut m = map_pages(1)?;
    for (i, b) in m.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| {
        KerndatError::Syscall {
            call: "pipe2",
            errno,
        }
    })?;
    let n = nix::fcntl::vmsplice(
        &w,
        &[IoSlice::new(m.as_mut_slice())],
        nix::fcntl::SpliceFFlags::empty(),
    )
    .map_err(|errno| KerndatError::Syscall {
        call: "vmsplice",
        errno,
    })?;
    drop(w);
    let mut back = Vec::with_capacity(n);
    File::from(r)
        .read_to_end(&mut back)
        .map_err(|e| io_err("pipe", e))?;
    let src = m.as_mut_slice();
    if back.len() == n && src.get(..n) == Some(&back[..]) {
        yes(format!("spliced and read back {n} bytes"))
    } else {
        no(format!(
            "spliced {n} bytes, read back {} that differ",
            back.len()
        ))
    }
}

// ---------------------------------------------------------------------------
// cgroups

struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
    super_opts: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_mountinfo() -> Result<Vec<MountEntry>, String> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e).to_string())?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let (Some(fstype), Some(_src), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape(mp)),
            fstype: fstype.to_string(),
            super_opts: opts.to_string(),
        });
    }
    Ok(out)
}

/// Create `<mount>/cryo-check-<pid>`, check that `file` exists in it, and
/// remove the directory again.
fn probe_cgroup_file(mount: &Path, file: &str) -> Result<Outcome, KerndatError> {
    let dir = mount.join(format!("cryo-check-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| io_err(&dir, e))?;
    let has = dir.join(file).exists();
    let removed = std::fs::remove_dir(&dir).map_err(|e| io_err(&dir, e));
    removed?;
    if has {
        yes(format!("{} has {file}", mount.display()))
    } else {
        no(format!("no {file} in a child of {}", mount.display()))
    }
}

fn probe_cgroup_v2_freezer(
    mounts: &Result<Vec<MountEntry>, String>,
) -> Result<Outcome, KerndatError> {
    let mounts = match mounts {
        Ok(m) => m,
        Err(e) => return no(e.clone()),
    };
    match mounts.iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => probe_cgroup_file(&m.mount_point, "cgroup.freeze"),
        None => no("no cgroup2 mount"),
    }
}

fn probe_cgroup_v1_freezer(
    mounts: &Result<Vec<MountEntry>, String>,
) -> Result<Outcome, KerndatError> {
    let mounts = match mounts {
        Ok(m) => m,
        Err(e) => return no(e.clone()),
    };
    let found = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "freezer"));
    match found {
        Some(m) => probe_cgroup_file(&m.mount_point, "freezer.state"),
        None => no("no cgroup v1 freezer mount"),
    }
}

// ---------------------------------------------------------------------------
// namespaces

struct NsKind {
    name: &'static str,
    feature: &'static str,
    flag: libc::c_int,
    cost: &'static str,
}

const NAMESPACES: &[NsKind] = &[
    NsKind {
        name: "user",
        feature: "ns-user",
        flag: libc::CLONE_NEWUSER,
        cost: "cannot restore tasks in their own user namespace",
    },
    NsKind {
        name: "pid",
        feature: "ns-pid",
        flag: libc::CLONE_NEWPID,
        cost: "cannot restore pid namespaces (pid clashes on restore more likely)",
    },
    NsKind {
        name: "net",
        feature: "ns-net",
        flag: libc::CLONE_NEWNET,
        cost: "cannot restore tasks in their own network namespace",
    },
    NsKind {
        name: "mnt",
        feature: "ns-mnt",
        flag: libc::CLONE_NEWNS,
        cost: "cannot restore mount namespaces",
    },
    NsKind {
        name: "uts",
        feature: "ns-uts",
        flag: libc::CLONE_NEWUTS,
        cost: "cannot restore hostname/domainname namespaces",
    },
    NsKind {
        name: "ipc",
        feature: "ns-ipc",
        flag: libc::CLONE_NEWIPC,
        cost: "cannot restore IPC namespaces (SysV objects, mqueues)",
    },
    NsKind {
        name: "cgroup",
        feature: "ns-cgroup",
        flag: libc::CLONE_NEWCGROUP,
        cost: "cannot restore cgroup namespaces",
    },
    NsKind {
        name: "time",
        feature: "ns-time",
        flag: CLONE_NEWTIME,
        cost: "cannot restore time namespaces (monotonic/boottime clocks jump)",
    },
];

fn probe_namespaces() -> Vec<Feature> {
    // Fork one child per namespace first, then reap them all: the unshares
    // run in parallel.
    let children: Vec<Result<Child, KerndatError>> = NAMESPACES
        .iter()
        .map(|ns| {
            let flag = ns.flag;
            spawn(|| sys::proc::fork_unshare(flag))
        })
        .collect();
    NAMESPACES
        .iter()
        .zip(children)
        .map(|(ns, child)| {
            let r = probe_one_ns(ns, child);
            feature(ns.feature, ns.cost, r)
        })
        .collect()
}

fn probe_one_ns(ns: &NsKind, child: Result<Child, KerndatError>) -> Result<Outcome, KerndatError> {
    let child = child?;
    let pid = child.pid().as_raw();
    let status = child.wait()?;
    let link = format!("/proc/self/ns/{}", ns.name);
    let has_link = std::fs::symlink_metadata(&link).is_ok();
    match status {
        WaitStatus::Exited(_, 0) if has_link => yes(format!("{link} exists, unshare works")),
        WaitStatus::Exited(_, 0) => no(format!("unshare works but {link} is missing")),
        other => match errno_from_exit(&other) {
            Some(errno) => no(format!("unshare in a child: {errno}")),
            None => Err(KerndatError::Child {
                probe: ns.feature,
                pid,
                status: format!("{other:?}"),
            }),
        },
    }
}

fn probe_timens_offsets() -> Result<Outcome, KerndatError> {
    let p = "/proc/self/timens_offsets";
    if Path::new(p).exists() {
        yes(format!("{p} exists"))
    } else {
        no(format!("{p} missing"))
    }
}

// ---------------------------------------------------------------------------
// vdso, prctl, capabilities

fn probe_vdso_movable() -> Result<Outcome, KerndatError> {
    let path = "/proc/self/smaps";
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut in_vdso = false;
    for line in text.lines() {
        if line.ends_with("[vdso]") {
            in_vdso = true;
        } else if in_vdso {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                let flags = flags.trim();
                return if flags.split_whitespace().any(|f| f == "sl") {
                    no(format!("[vdso] is sealed (VmFlags: {flags})"))
                } else {
                    yes(format!("[vdso] not sealed (VmFlags: {flags})"))
                };
            }
        }
    }
    if in_vdso {
        yes("[vdso] has no VmFlags line (no sealing support)")
    } else {
        yes("no [vdso] mapped")
    }
}

fn probe_pr_set_mm_map() -> Result<Outcome, KerndatError> {
    let size = sys::proc::mm_map_size().map_err(sys_err("prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)"))?;
    if size == 104 {
        yes("prctl_mm_map size 104")
    } else {
        Err(KerndatError::Unexpected {
            what: "prctl_mm_map size",
            expected: "104".into(),
            found: size.to_string(),
        })
    }
}

fn probe_timer_restore_ids() -> Result<Outcome, KerndatError> {
    let r = sys::proc::timer_restore_ids_mode()
        .map_err(sys_err("prctl(PR_TIMER_CREATE_RESTORE_IDS, GET)"))?;
    yes(format!("current mode {r}"))
}

fn status_caps(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn probe_cap_sys_resource() -> Result<Outcome, KerndatError> {
    let path = "/proc/self/status";
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let Some(eff) = status_caps(&text, "CapEff:") else {
        return Err(KerndatError::Unexpected {
            what: "/proc/self/status",
            expected: "a CapEff line".into(),
            found: "none".into(),
        });
    };
    let bit = 1u64 << CAP_SYS_RESOURCE;
    if eff & bit != 0 {
        return yes(format!("CapEff {eff:#x}"));
    }
    let bnd = match status_caps(&text, "CapBnd:") {
        Some(b) if b & bit == 0 => ", not in the bounding set",
        _ => "",
    };
    no(format!("CapEff {eff:#x} lacks bit {CAP_SYS_RESOURCE}{bnd}"))
}

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

    #[test]
    fn unescape_mountinfo() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\"), r"/end\");
    }
}
