//! The parasite lifecycle (what CRIU calls compel): seize a task, run
//! single syscalls in it, map and start the parasite blob, talk to it over
//! a SOCK_SEQPACKET socket, and cure the task: put back its registers,
//! XSAVE state and signal mask exactly as they were and detach.
//!
//! Every step that changes the task is undone by [`Victim::cure`], which
//! `Drop` calls if nobody did, so an error anywhere leaves the task
//! running as before.

pub mod blob;
pub mod guard;
mod rpc;
mod syscall;

use std::io::IoSlice;
use std::mem::size_of;
use std::os::fd::OwnedFd;
use std::time::Duration;

use cryo_parasite::*;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sigframe::Regs;
use crate::sys::{self, SysError};
use blob::{Blob, BlobError};

#[derive(Debug, thiserror::Error)]
pub enum InfectError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("ptrace {op} on task {pid}: {errno}")]
    Ptrace {
        op: &'static str,
        pid: i32,
        errno: Errno,
    },
    #[error("task {pid} exited while cryo was working on it ({status})")]
    Gone { pid: i32, status: String },
    #[error("task {pid} stopped unexpectedly: {status} at rip {rip:#x}")]
    Unexpected { pid: i32, status: String, rip: u64 },
    #[error("injected syscall {nr} in task {pid} failed: {errno}")]
    Syscall { pid: i32, nr: u64, errno: Errno },
    #[error("task {pid} has no executable mapping to run syscalls from")]
    NoExec { pid: i32 },
    #[error("reading /proc/{pid}/maps: {source}")]
    Maps {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("parasite in task {pid}: {what}: {errno}")]
    Channel {
        pid: i32,
        what: &'static str,
        errno: Errno,
    },
    #[error("task {pid}: injected failure ({what}) from CRYO_FAULT")]
    Fault { pid: i32, what: String },
    #[error("parasite in task {pid} did not answer command {cmd} within {secs} s")]
    Timeout { pid: i32, cmd: u32, secs: u64 },
    #[error("parasite in task {pid}: command {cmd} failed: {errno}")]
    Command { pid: i32, cmd: u32, errno: Errno },
    #[error("parasite in task {pid}: short reply to command {cmd} ({got} bytes)")]
    ShortReply { pid: i32, cmd: u32, got: usize },
    #[error("copying the parasite into task {pid}: {errno}")]
    Write { pid: i32, errno: Errno },
}

type Result<T> = std::result::Result<T, InfectError>;

const PAGE: u64 = 4096;
const ARGS_LEN: u64 = 5 * PAGE;
const STACK_LEN: u64 = 64 * 1024;
// Offsets inside the args region.
const OFF_PAIR: u64 = 64;
const OFF_ALTSTACK: u64 = 128;
/// Where other threads of the task write what injected syscalls return
/// through memory (their sigaltstack, tid address).
const OFF_THREAD_SCRATCH: u64 = 256;
const OFF_FRAME: u64 = 512;
const OFF_FPSTATE: u64 = PAGE;
/// How long a parasite command may take: every one is a few system calls
/// in the task (a page batch's reply is awaited after its pipe was
/// drained), so a parasite silent this long is stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Syscall,
    Interrupt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Seized and asked to stop; nothing saved or changed yet.
    Attached,
    /// Seized and stopped; registers saved.
    Stopped,
    /// The parasite runs and serves commands.
    Running,
    /// Back in the task's own context and detached.
    Cured,
    /// Killed on purpose (dump without --leave-running).
    Killed,
}

/// A seized task.
pub struct Victim {
    pub pid: Pid,
    pidfd: OwnedFd,
    saved: Regs,
    saved_xstate: Vec<u8>,
    saved_mask: u64,
    inject_at: u64,
    inject_orig: Option<u64>,
    /// `syscall; jmp .` is written over the injection site (between
    /// injected syscalls the task waits on that spin).
    patched: bool,
    /// The guardian's pipe: told of every injected syscall.
    notifier: Option<OwnedFd>,
    area: Option<(u64, u64)>,
    blob: Option<Blob>,
    sock: Option<OwnedFd>,
    task_sock: i32,
    /// Descriptors cryo made in the task that nothing else will close
    /// (the socket pair before the parasite owns it).
    stray_fds: Vec<i32>,
    phase: Phase,
    /// Descriptors sent to the parasite so far.
    sent_fds: u32,
    /// What they are (their /proc link, `pipe:[INODE]`), to find and close
    /// the task's copies from outside if the parasite cannot.
    sent_links: Vec<String>,
    /// Mappings made readable for the page transfer, to put back to their
    /// protection (start, length, prot): by the parasite once the pages
    /// are out, else by injected mprotect calls when the task is cured.
    reprotect: Vec<(u64, u64, u32)>,
    /// The command that went unanswered: the parasite is not listening,
    /// so it is stopped from outside without a FINI.
    silent: std::cell::Cell<Option<u32>>,
    /// The task was stopped (SIGSTOP, job control) when seized: it goes
    /// back to that stop by itself on detach, and a restore stops it.
    stopped: bool,
    /// A stop signal arrived while cryo worked in the task and was held
    /// back: it is raised again once the task is detached.
    held_stop: std::cell::Cell<bool>,
}

/// SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU.
fn is_stop_signal(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
    )
}

/// What [`Victim::thread_state`] reads from a thread.
#[derive(Debug, Clone, Copy)]
pub struct ThreadState {
    pub altstack: KStack,
    pub tid_address: u64,
    pub securebits: u32,
    pub pdeath_signal: u32,
}

/// A step of the dump (CRYO_FAULT `fail-step-N`, see [`crate::fault::step`]).
fn fault_step(pid: Pid, what: &str) -> Result<()> {
    match crate::fault::step(what) {
        Some(what) => Err(InfectError::Fault {
            pid: pid.as_raw(),
            what,
        }),
        None => Ok(()),
    }
}

fn ptrace_err(op: &'static str, pid: Pid) -> impl FnOnce(Errno) -> InfectError {
    move |errno| InfectError::Ptrace {
        op,
        pid: pid.as_raw(),
        errno,
    }
}

impl Victim {
    /// PTRACE_SEIZE + PTRACE_INTERRUPT, wait for the stop, save the
    /// registers, XSAVE area and signal mask, and block every signal.
    pub fn seize(pid: Pid) -> Result<Victim> {
        let mut v = Victim::attach(pid)?;
        v.wait_stopped()?;
        Ok(v)
    }

    /// PTRACE_SEIZE + PTRACE_INTERRUPT without waiting for the stop: a task
    /// frozen by a cgroup freezer only stops once thawed, so every task is
    /// attached while frozen and waited for after the thaw.
    pub fn attach(pid: Pid) -> Result<Victim> {
        fault_step(pid, "seizing the task")?;
        let pidfd = sys::pidfd_open(pid)?;
        // TRACESYSGOOD: injected syscalls are driven by syscall stops.
        ptrace::seize(pid, ptrace::Options::PTRACE_O_TRACESYSGOOD)
            .map_err(ptrace_err("SEIZE", pid))?;
        let v = Victim {
            pid,
            pidfd,
            // SAFETY: user_regs_struct is plain integers; zero is valid and
            // is overwritten by wait_stopped before any use.
            saved: unsafe { std::mem::zeroed() },
            saved_xstate: Vec::new(),
            saved_mask: 0,
            inject_at: 0,
            inject_orig: None,
            patched: false,
            notifier: None,
            area: None,
            blob: None,
            sock: None,
            task_sock: -1,
            stray_fds: Vec::new(),
            phase: Phase::Attached,
            sent_fds: 0,
            sent_links: Vec::new(),
            reprotect: Vec::new(),
            silent: std::cell::Cell::new(None),
            stopped: false,
            held_stop: std::cell::Cell::new(false),
        };
        if let Err(errno) = ptrace::interrupt(pid) {
            // Dropping `v` detaches: the task runs on untouched.
            return Err(ptrace_err("INTERRUPT", pid)(errno));
        }
        Ok(v)
    }

    /// Wait for the stop requested by [`Victim::attach`], then save the
    /// registers, XSAVE area and signal mask and block every signal.
    pub fn wait_stopped(&mut self) -> Result<()> {
        if let Err(e) = self.stop_and_save() {
            // Still only attached: detach so the task runs on untouched.
            let _ = ptrace::detach(self.pid, None);
            self.phase = Phase::Cured;
            return Err(e);
        }
        self.phase = Phase::Stopped;
        Ok(())
    }

    /// Take over a task this process already traces and that sits in a
    /// ptrace stop (used at the end of a restore).
    pub fn attach_stopped(pid: Pid) -> Result<Victim> {
        let pidfd = sys::pidfd_open(pid)?;
        let mut v = Victim {
            pid,
            pidfd,
            saved: ptrace::getregs(pid).map_err(ptrace_err("GETREGS", pid))?,
            saved_xstate: Vec::new(),
            saved_mask: 0,
            inject_at: 0,
            inject_orig: None,
            patched: false,
            notifier: None,
            area: None,
            blob: None,
            sock: None,
            task_sock: -1,
            stray_fds: Vec::new(),
            phase: Phase::Stopped,
            sent_fds: 0,
            sent_links: Vec::new(),
            reprotect: Vec::new(),
            silent: std::cell::Cell::new(None),
            stopped: false,
            held_stop: std::cell::Cell::new(false),
        };
        v.saved_xstate = sys::get_xstate(pid)?;
        v.saved_mask = sys::get_sigmask(pid)?;
        sys::set_sigmask(pid, !0u64)?;
        Ok(v)
    }

    fn stop_and_save(&mut self) -> Result<()> {
        let pid = self.pid;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)).map_err(ptrace_err("wait", pid))? {
                WaitStatus::PtraceEvent(_, sig, ev) if ev == libc::PTRACE_EVENT_STOP => {
                    // A stopped task reports its group stop (with the stop
                    // signal) instead of the interrupt's trap (SIGTRAP).
                    self.stopped = is_stop_signal(sig);
                    break;
                }
                WaitStatus::Stopped(_, sig) => {
                    // A signal was being delivered: let it go through; the
                    // interrupt stays pending and stops the task right after.
                    ptrace::cont(pid, Some(sig)).map_err(ptrace_err("CONT", pid))?;
                }
                WaitStatus::PtraceEvent(..)
                | WaitStatus::PtraceSyscall(_)
                | WaitStatus::Continued(_)
                | WaitStatus::StillAlive => {}
                st => {
                    return Err(InfectError::Gone {
                        pid: pid.as_raw(),
                        status: format!("{st:?}"),
                    })
                }
            }
        }
        self.saved = ptrace::getregs(pid).map_err(ptrace_err("GETREGS", pid))?;
        self.saved_xstate = sys::get_xstate(pid)?;
        self.saved_mask = sys::get_sigmask(pid)?;
        sys::set_sigmask(pid, !0u64)?;
        Ok(())
    }

    /// Whether the task was stopped (SIGSTOP, job control) when seized.
    pub fn was_stopped(&self) -> bool {
        self.stopped
    }

    /// The parasite's mapping in the task, once made.
    pub fn area(&self) -> Option<(u64, u64)> {
        self.area
    }

    pub fn regs(&self) -> &Regs {
        &self.saved
    }
    pub fn xstate(&self) -> &[u8] {
        &self.saved_xstate
    }
    pub fn sigmask(&self) -> u64 {
        self.saved_mask
    }

    /// Make [`Victim::cure`] put back `mask` instead of the mask found at
    /// the seize (the guardian repairing a task cryo left blocked).
    pub fn set_saved_mask(&mut self, mask: u64) {
        self.saved_mask = mask;
    }

    /// Make [`Victim::cure`] put back these registers and XSAVE area (the
    /// guardian repairing a task cryo left in an injected syscall).
    pub fn set_saved_state(&mut self, regs: Regs, xstate: Vec<u8>) {
        self.saved = regs;
        self.saved_xstate = xstate;
    }

    /// Tell the guardian behind `fd` about every injected syscall.
    pub fn set_notifier(&mut self, fd: Option<OwnedFd>) {
        self.notifier = fd;
    }

    /// Address of the blob's final spin (`_cryo_done`), once started.
    pub fn parasite_done_addr(&self) -> Option<u64> {
        Some(self.area?.0 + self.blob.as_ref()?.done as u64)
    }

    /// Where injected syscalls run, once it was chosen.
    pub fn injection_addr(&self) -> Option<u64> {
        (self.inject_at != 0).then_some(self.inject_at)
    }

    /// Undo everything: stop the parasite, unmap it, put back registers,
    /// XSAVE state and signal mask, detach.
    pub fn cure(&mut self) -> Result<()> {
        if matches!(self.phase, Phase::Cured | Phase::Killed) {
            return Ok(());
        }
        if self.phase == Phase::Attached {
            // Nothing was changed yet. PTRACE_DETACH needs the task in a
            // stop: if the requested one has not happened yet, wait for it.
            self.phase = Phase::Cured;
            let pid = self.pid;
            if let Err(Errno::ESRCH) = ptrace::detach(pid, None) {
                let sig = loop {
                    match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                        Ok(WaitStatus::PtraceEvent(..)) => break None,
                        // A signal was on its way: let it through.
                        Ok(WaitStatus::Stopped(_, sig)) => break Some(sig),
                        Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => {
                            return Ok(())
                        }
                        Ok(_) => {}
                    }
                };
                return ptrace::detach(pid, sig).map_err(ptrace_err("DETACH", pid));
            }
            return Ok(());
        }
        let pid = self.pid;
        let mut first_err = self.stop_parasite().err();
        // The parasite never started: close what we made in the task.
        for fd in std::mem::take(&mut self.stray_fds) {
            let _ = self.syscall(libc::SYS_close as u64, [fd as u64, 0, 0, 0, 0, 0]);
        }
        self.task_sock = -1;
        // Mappings still readable for a transfer that did not finish.
        for (start, len, prot) in std::mem::take(&mut self.reprotect) {
            let args = [start, len, prot as u64, 0, 0, 0];
            if let Err(e) = self.syscall(libc::SYS_mprotect as u64, args) {
                first_err.get_or_insert(e);
            }
        }
        if let Some((addr, len)) = self.area.take() {
            if let Err(e) = self.syscall(libc::SYS_munmap as u64, [addr, len, 0, 0, 0, 0]) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.unpatch() {
            first_err.get_or_insert(e);
        }
        let restore = (|| {
            ptrace::setregs(pid, self.saved).map_err(ptrace_err("SETREGS", pid))?;
            sys::set_xstate(pid, &self.saved_xstate)?;
            sys::set_sigmask(pid, self.saved_mask)?;
            Ok::<(), InfectError>(())
        })();
        if let Err(e) = restore {
            first_err.get_or_insert(e);
        }
        let det = ptrace::detach(pid, None).map_err(ptrace_err("DETACH", pid));
        self.phase = Phase::Cured;
        if let Err(e) = det {
            first_err.get_or_insert(e);
        }
        if self.held_stop.get() {
            // The stop signal held back while cryo worked: the task gets it
            // now. (A task stopped before the seize goes back to its stop on
            // detach by itself.)
            // kill() of a tid signals its whole thread group.
            let _ = nix::sys::signal::kill(pid, Signal::SIGSTOP);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Kill the task (dump without --leave-running) and wait until it is
    /// gone, so its pid can be restored right away. SIGKILL ends the whole
    /// thread group: the other threads' victims are then reaped with
    /// [`Victim::reap_killed`] (before the leader's, whose exit the kernel
    /// reports last).
    pub fn kill(&mut self) -> Result<()> {
        let pid = self.pid;
        self.stop_parasite().ok();
        nix::sys::signal::kill(pid, Signal::SIGKILL).map_err(ptrace_err("kill", pid))?;
        self.reap_killed()
    }

    /// Send SIGKILL to the process without waiting for it.
    pub fn send_kill(&mut self) -> Result<()> {
        let pid = self.pid;
        self.stop_parasite().ok();
        nix::sys::signal::kill(pid, Signal::SIGKILL).map_err(ptrace_err("kill", pid))
    }

    /// Wait until this task, killed with its process, is gone.
    pub fn reap_killed(&mut self) -> Result<()> {
        let pid = self.pid;
        self.phase = Phase::Killed;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    break
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => return Err(ptrace_err("wait", pid)(errno)),
            }
        }
        Ok(())
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if let Err(e) = self.cure() {
            tracing::error!(
                pid = self.pid.as_raw(),
                "could not return task to its state: {e}"
            );
        }
    }
}

/// Descriptors of the task whose /proc link is one of `links` (the
/// descriptors cryo sent to the parasite).
fn fds_linked_to(pid: Pid, links: &[String]) -> Vec<i32> {
    if links.is_empty() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let l = link.to_string_lossy();
            if links.iter().any(|o| o == &*l) {
                e.file_name().to_str()?.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// View a plain-data ABI struct as bytes.
pub(crate) fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is one of the #[repr(C)] integer-only ABI structs; reading
    // its bytes (padding included, which we zero-initialise or ignore) is
    // fine for sending them over a socket.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

/// Read a plain-data ABI struct from the start of `buf` (which must be at
/// least `size_of::<T>()` long).
pub(crate) fn from_bytes<T: Copy>(buf: &[u8]) -> T {
    assert!(
        buf.len() >= size_of::<T>(),
        "buffer shorter than the ABI struct"
    );
    // SAFETY: the length is checked above; read_unaligned copes with any
    // alignment; T is an integer-only #[repr(C)] struct, valid for every
    // bit pattern.
    unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const T) }
}
