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

use std::io::IoSlice;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use cryo_parasite::*;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sigframe::{self, Regs};
use crate::sys::{self, SysError};
use blob::{Blob, BlobError, PARASITE_ELF};

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
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

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
}

/// What [`Victim::thread_state`] reads from a thread.
#[derive(Debug, Clone, Copy)]
pub struct ThreadState {
    pub altstack: KStack,
    pub tid_address: u64,
    pub securebits: u32,
    pub pdeath_signal: u32,
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
                WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => break,
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

    fn find_inject_addr(&mut self) -> Result<u64> {
        if self.inject_at != 0 {
            return Ok(self.inject_at);
        }
        let pid = self.pid;
        let maps = procfs::process::Process::new(pid.as_raw())
            .and_then(|p| p.maps())
            .map_err(|source| InfectError::Maps {
                pid: pid.as_raw(),
                source,
            })?;
        for m in maps {
            use procfs::process::{MMPermissions, MMapPath};
            if m.perms.contains(MMPermissions::EXECUTE)
                && m.perms.contains(MMPermissions::READ)
                && !matches!(m.pathname, MMapPath::Vdso | MMapPath::Vsyscall)
                && m.address.0 < 0x8000_0000_0000
            {
                self.inject_at = m.address.0;
                return Ok(m.address.0);
            }
        }
        Err(InfectError::NoExec { pid: pid.as_raw() })
    }

    /// Where injected syscalls run and the original word there (read
    /// once; cryo puts it back after every call).
    pub fn injection_site(&mut self) -> Result<(u64, u64)> {
        let at = self.find_inject_addr()?;
        let orig = match self.inject_orig {
            Some(o) => o,
            None => {
                let o = ptrace::read(self.pid, at as _).map_err(ptrace_err("PEEKDATA", self.pid))?
                    as u64;
                self.inject_orig = Some(o);
                o
            }
        };
        Ok((at, orig))
    }

    /// Wait for the next stop of `want` kind, letting group stops go.
    fn wait_for(&self, want: Stop) -> Result<()> {
        let pid = self.pid;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)).map_err(ptrace_err("wait", pid))? {
                WaitStatus::PtraceSyscall(_) if want == Stop::Syscall => return Ok(()),
                WaitStatus::PtraceEvent(_, _, ev)
                    if want == Stop::Interrupt && ev == libc::PTRACE_EVENT_STOP =>
                {
                    return Ok(())
                }
                WaitStatus::PtraceEvent(..) => {
                    // A group stop (SIGSTOP arrived): keep the task going.
                    ptrace::cont(pid, None).map_err(ptrace_err("CONT", pid))?;
                }
                WaitStatus::Stopped(_, sig) => {
                    let rip = ptrace::getregs(pid).map(|r| r.rip).unwrap_or(0);
                    return Err(InfectError::Unexpected {
                        pid: pid.as_raw(),
                        status: format!("signal {sig}"),
                        rip,
                    });
                }
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    return Err(InfectError::Gone {
                        pid: pid.as_raw(),
                        status: "exited".into(),
                    })
                }
                _ => {}
            }
        }
    }

    /// Let the task run into a `jmp .` spin and stop it there with
    /// PTRACE_INTERRUPT: the task ends up in an interrupt stop, from which
    /// a later detach applies the kernel's syscall restart rules.
    fn spin_and_stop(&self) -> Result<()> {
        let pid = self.pid;
        ptrace::cont(pid, None).map_err(ptrace_err("CONT", pid))?;
        ptrace::interrupt(pid).map_err(ptrace_err("INTERRUPT", pid))?;
        self.wait_for(Stop::Interrupt)
    }

    /// Run one system call inside the stopped task and return its result.
    /// The task runs `syscall; jmp .` written over its code, driven by
    /// syscall stops, and is left stopped on the spin: if cryo dies at any
    /// point, the task spins in cryo's code instead of running its own
    /// with cryo's registers, and the guardian puts it back. The code word
    /// goes back before the parasite starts and in [`Victim::cure`].
    pub fn syscall(&mut self, nr: u64, args: [u64; 6]) -> Result<i64> {
        let pid = self.pid;
        let (at, orig) = self.injection_site()?;
        if let Some(n) = &self.notifier {
            let _ = nix::unistd::write(n, &guard::record(guard::MSG_INJECT, pid, nr, 0));
        }
        if !self.patched {
            // syscall (0f 05); jmp . (eb fe)
            let code = (orig & !0xffff_ffff) | 0xfeeb_050f;
            ptrace::write(pid, at as _, code as i64).map_err(ptrace_err("POKEDATA", pid))?;
            self.patched = true;
        }
        let mut r = self.saved;
        r.rax = nr;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        r.rip = at;
        r.orig_rax = u64::MAX;
        ptrace::setregs(pid, r).map_err(ptrace_err("SETREGS", pid))?;
        ptrace::syscall(pid, None).map_err(ptrace_err("SYSCALL", pid))?;
        self.wait_for(Stop::Syscall)?; // entry
        crate::fault::check("in-syscall");
        ptrace::syscall(pid, None).map_err(ptrace_err("SYSCALL", pid))?;
        self.wait_for(Stop::Syscall)?; // exit
        let v = ptrace::getregs(pid)
            .map_err(ptrace_err("GETREGS", pid))?
            .rax as i64;
        self.spin_and_stop()?;
        if (-4095..0).contains(&v) {
            return Err(InfectError::Syscall {
                pid: pid.as_raw(),
                nr,
                errno: Errno::from_raw(-v as i32),
            });
        }
        Ok(v)
    }

    /// A userfaultfd on the task's memory. It must be made inside the task
    /// (a userfaultfd belongs to the mm of its creator), so the syscall is
    /// injected; cryo takes the descriptor with pidfd_getfd and closes the
    /// task's copy before this returns, so its descriptor table is as it
    /// was. A full descriptor (kernel-mode faults are handled too) needs
    /// CAP_SYS_PTRACE in the task or vm.unprivileged_userfaultfd;
    /// `user_mode_only` (UFFD_USER_MODE_ONLY, enough for asynchronous
    /// write-protect tracking) needs nothing.
    pub fn userfaultfd(&mut self, user_mode_only: bool) -> Result<OwnedFd> {
        const SYS_USERFAULTFD: u64 = 323;
        const UFFD_USER_MODE_ONLY: u64 = 1;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64
            | if user_mode_only {
                UFFD_USER_MODE_ONLY
            } else {
                0
            };
        let fd = self.syscall(SYS_USERFAULTFD, [flags, 0, 0, 0, 0, 0])? as i32;
        self.stray_fds.push(fd);
        let ours = sys::pidfd_getfd(&self.pidfd, self.pid, fd);
        let closed = self.syscall(libc::SYS_close as u64, [fd as u64, 0, 0, 0, 0, 0]);
        if closed.is_ok() {
            self.stray_fds.retain(|&f| f != fd);
        }
        closed?;
        Ok(ours?)
    }

    /// Run injected syscalls in this task at the injection site `leader`
    /// found (the same code, as both share one address space), so the site
    /// is looked up and read once per process.
    pub fn share_site(&mut self, leader: &Victim) {
        if leader.inject_orig.is_some() {
            self.inject_at = leader.inject_at;
            self.inject_orig = leader.inject_orig;
        }
    }

    /// Scratch memory inside the running parasite's area, where another
    /// thread of the same process can have injected syscalls write.
    pub fn thread_scratch(&self) -> Option<u64> {
        let (addr, _) = self.area?;
        Some(addr + self.blob.as_ref()?.image.len() as u64 + OFF_THREAD_SCRATCH)
    }

    /// The per-thread state only the thread itself can read, by injected
    /// syscalls that write into `scratch` (memory of the same process, see
    /// [`Victim::thread_scratch`]). The thread's code goes back over the
    /// injection site before this returns.
    pub fn thread_state(&mut self, scratch: u64) -> Result<ThreadState> {
        let res = (|| -> Result<ThreadState> {
            self.syscall(libc::SYS_sigaltstack as u64, [0, scratch, 0, 0, 0, 0])?;
            let mut ss = [0u8; 24];
            self.read_mem(scratch, &mut ss)?;
            let altstack = KStack {
                sp: u64::from_ne_bytes(ss[0..8].try_into().unwrap_or_default()),
                flags: i32::from_ne_bytes(ss[8..12].try_into().unwrap_or_default()),
                _pad: 0,
                size: u64::from_ne_bytes(ss[16..24].try_into().unwrap_or_default()),
            };
            self.syscall(
                libc::SYS_prctl as u64,
                [libc::PR_GET_TID_ADDRESS as u64, scratch, 0, 0, 0, 0],
            )?;
            let mut w = [0u8; 8];
            self.read_mem(scratch, &mut w)?;
            let tid_address = u64::from_ne_bytes(w);
            let securebits = self.syscall(
                libc::SYS_prctl as u64,
                [libc::PR_GET_SECUREBITS as u64, 0, 0, 0, 0, 0],
            )?;
            self.syscall(
                libc::SYS_prctl as u64,
                [libc::PR_GET_PDEATHSIG as u64, scratch, 0, 0, 0, 0],
            )?;
            let mut w = [0u8; 4];
            self.read_mem(scratch, &mut w)?;
            Ok(ThreadState {
                altstack,
                tid_address,
                securebits: securebits as u32,
                pdeath_signal: i32::from_ne_bytes(w) as u32,
            })
        })();
        let unpatched = self.unpatch();
        let st = res?;
        unpatched?;
        Ok(st)
    }

    /// Put the task's own code back over the injection site.
    fn unpatch(&mut self) -> Result<()> {
        if self.patched {
            let (at, orig) = self.injection_site()?;
            ptrace::write(self.pid, at as _, orig as i64)
                .map_err(ptrace_err("POKEDATA", self.pid))?;
            self.patched = false;
        }
        Ok(())
    }

    fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        let iov = [IoSlice::new(data)];
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: data.len(),
        }];
        let n = process_vm_writev(self.pid, &iov, &remote).map_err(|errno| InfectError::Write {
            pid: self.pid.as_raw(),
            errno,
        })?;
        if n != data.len() {
            return Err(InfectError::Write {
                pid: self.pid.as_raw(),
                errno: Errno::EIO,
            });
        }
        Ok(())
    }

    fn read_mem(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        let len = out.len();
        let mut iov = [std::io::IoSliceMut::new(out)];
        let remote = [RemoteIoVec {
            base: addr as usize,
            len,
        }];
        let n =
            process_vm_readv(self.pid, &mut iov, &remote).map_err(|errno| InfectError::Write {
                pid: self.pid.as_raw(),
                errno,
            })?;
        if n != len {
            return Err(InfectError::Write {
                pid: self.pid.as_raw(),
                errno: Errno::EIO,
            });
        }
        Ok(())
    }

    /// Map the parasite into the task, connect a control socket and start
    /// it. The parasite serves commands until [`Victim::cure`].
    pub fn start_parasite(&mut self) -> Result<()> {
        let pid = self.pid;
        // Load the blob first to learn its size.
        let probe = Blob::load("parasite", PARASITE_ELF, 0)?;
        let blob_len = probe.image.len() as u64;
        let total = blob_len + ARGS_LEN + STACK_LEN;
        let addr = self.syscall(
            libc::SYS_mmap as u64,
            [
                0,
                total,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )? as u64;
        self.area = Some((addr, total));
        if let Some(n) = &self.notifier {
            let _ = nix::unistd::write(n, &guard::record(guard::MSG_AREA, pid, addr, total));
        }
        let blob = Blob::load("parasite", PARASITE_ELF, addr)?;
        self.write_mem(addr, &blob.image)?;
        if blob.text.1 > blob.text.0 {
            self.syscall(
                libc::SYS_mprotect as u64,
                [
                    addr + blob.text.0 as u64,
                    (blob.text.1 - blob.text.0) as u64,
                    (libc::PROT_READ | libc::PROT_EXEC) as u64,
                    0,
                    0,
                    0,
                ],
            )?;
        }
        let args_at = addr + blob_len;
        // The control socket: a pair made inside the task; we take one end
        // with pidfd_getfd and close it there.
        crate::fault::check("before-socketpair");
        self.syscall(
            libc::SYS_socketpair as u64,
            [
                libc::AF_UNIX as u64,
                (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64,
                0,
                args_at + OFF_PAIR,
                0,
                0,
            ],
        )?;
        let mut pair = [0u8; 8];
        self.read_mem(args_at + OFF_PAIR, &mut pair)?;
        let task_end = i32::from_ne_bytes([pair[0], pair[1], pair[2], pair[3]]);
        let our_end = i32::from_ne_bytes([pair[4], pair[5], pair[6], pair[7]]);
        self.task_sock = task_end;
        self.stray_fds = vec![task_end, our_end];
        crate::fault::check("after-socketpair");
        let sock = sys::pidfd_getfd(&self.pidfd, pid, our_end)?;
        self.sock = Some(sock);
        self.syscall(libc::SYS_close as u64, [our_end as u64, 0, 0, 0, 0, 0])?;
        self.stray_fds.retain(|&fd| fd != our_end);

        // The task's alternate signal stack goes into the frame that lets
        // the parasite return on its own if we die.
        self.syscall(
            libc::SYS_sigaltstack as u64,
            [0, args_at + OFF_ALTSTACK, 0, 0, 0, 0],
        )?;
        let mut ss = [0u8; 24];
        self.read_mem(args_at + OFF_ALTSTACK, &mut ss)?;
        let altstack = KStack {
            sp: u64::from_ne_bytes(ss[0..8].try_into().unwrap_or_default()),
            flags: i32::from_ne_bytes(ss[8..12].try_into().unwrap_or_default()),
            _pad: 0,
            size: u64::from_ne_bytes(ss[16..24].try_into().unwrap_or_default()),
        };
        let mut regs = self.saved;
        sigframe::apply_syscall_restart(&mut regs);
        let fp_at = args_at + OFF_FPSTATE;
        let fp = sigframe::build_fpstate(&self.saved_xstate);
        let frame = sigframe::build_frame(&regs, self.saved_mask, &altstack, fp_at);
        self.write_mem(args_at + OFF_FRAME, &frame)?;
        self.write_mem(fp_at, &fp)?;
        let pargs = ParasiteArgs {
            sock_fd: task_end as i64,
            sigframe: args_at + OFF_FRAME,
        };
        self.write_mem(args_at, as_bytes(&pargs))?;

        let mut r = self.saved;
        // The page holding the injection site is dumped while the parasite
        // runs: it must hold the task's own code again.
        self.unpatch()?;
        r.rip = addr + blob.entry as u64;
        r.rsp = addr + total - 64;
        r.rdi = args_at;
        r.orig_rax = u64::MAX;
        r.rax = 0;
        ptrace::setregs(pid, r).map_err(ptrace_err("SETREGS", pid))?;
        ptrace::cont(pid, None).map_err(ptrace_err("CONT", pid))?;
        self.blob = Some(blob);
        self.phase = Phase::Running;
        // The parasite owns its socket end now and closes it itself.
        self.stray_fds.clear();
        Ok(())
    }

    fn sock_fd(&self) -> Result<RawFd> {
        self.sock
            .as_ref()
            .map(|s| s.as_raw_fd())
            .ok_or(InfectError::Channel {
                pid: self.pid.as_raw(),
                what: "no control socket",
                errno: Errno::ENOTCONN,
            })
    }

    fn send(&self, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
        let sock = self.sock_fd()?;
        let iov = [IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(|errno| {
            InfectError::Channel {
                pid: self.pid.as_raw(),
                what: "send",
                errno,
            }
        })?;
        Ok(())
    }

    /// Wait for one reply, watching the task at the same time so a
    /// crashed parasite is an error, not a hang.
    fn recv(&self, cmd: u32, out: &mut [u8]) -> Result<usize> {
        let pid = self.pid;
        let sock = self.sock.as_ref().ok_or(InfectError::Channel {
            pid: pid.as_raw(),
            what: "no control socket",
            errno: Errno::ENOTCONN,
        })?;
        let start = Instant::now();
        loop {
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::from(100u16)).map_err(|errno| {
                InfectError::Channel {
                    pid: pid.as_raw(),
                    what: "poll",
                    errno,
                }
            })?;
            if n > 0 {
                let got = nix::sys::socket::recv(sock.as_raw_fd(), out, MsgFlags::empty())
                    .map_err(|errno| InfectError::Channel {
                        pid: pid.as_raw(),
                        what: "recv",
                        errno,
                    })?;
                if got == 0 {
                    return Err(InfectError::Channel {
                        pid: pid.as_raw(),
                        what: "control socket closed",
                        errno: Errno::ECONNRESET,
                    });
                }
                return Ok(got);
            }
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                Ok(WaitStatus::PtraceEvent(..)) => {
                    let _ = ptrace::cont(pid, None);
                }
                Ok(st) => {
                    let rip = ptrace::getregs(pid).map(|r| r.rip).unwrap_or(0);
                    return Err(InfectError::Unexpected {
                        pid: pid.as_raw(),
                        status: format!("{st:?} while the parasite ran"),
                        rip,
                    });
                }
                Err(errno) => return Err(ptrace_err("wait", pid)(errno)),
            }
            if start.elapsed() > COMMAND_TIMEOUT {
                return Err(InfectError::Timeout {
                    pid: pid.as_raw(),
                    cmd,
                    secs: COMMAND_TIMEOUT.as_secs(),
                });
            }
        }
    }

    fn simple_reply(&self, cmd: u32) -> Result<i64> {
        let mut rep = [0u8; size_of::<Reply>()];
        let got = self.recv(cmd, &mut rep)?;
        if got < size_of::<Reply>() {
            return Err(InfectError::ShortReply {
                pid: self.pid.as_raw(),
                cmd,
                got,
            });
        }
        let r: Reply = from_bytes(&rep);
        if r.err < 0 {
            return Err(InfectError::Command {
                pid: self.pid.as_raw(),
                cmd,
                errno: Errno::from_raw(-r.err),
            });
        }
        Ok(r.value)
    }

    /// Hand descriptors to the parasite; returns the index of the first in
    /// the parasite's table (used by [`Victim::splice_pages_start`]).
    pub fn send_fds(&mut self, fds: &[RawFd]) -> Result<u32> {
        let hdr = CmdHeader {
            cmd: CMD_RECV_FDS,
            ..Default::default()
        };
        self.send(as_bytes(&hdr), fds)?;
        let total = self.simple_reply(CMD_RECV_FDS)? as u32;
        let first = self.sent_fds;
        self.sent_fds = total;
        Ok(first)
    }

    fn iov_cmd(cmd: u32, arg: u32, iovs: &[Iov]) -> Vec<u8> {
        let hdr = CmdHeader {
            cmd,
            arg,
            count: iovs.len() as u32,
            _pad: 0,
        };
        let mut buf = Vec::with_capacity(16 + iovs.len() * 16);
        buf.extend_from_slice(as_bytes(&hdr));
        for iov in iovs {
            buf.extend_from_slice(as_bytes(iov));
        }
        buf
    }

    /// Ask the parasite to vmsplice these ranges into pipe `pipe_idx`;
    /// returns once it has (the caller then drains the pipe).
    pub fn splice_pages_start(&self, pipe_idx: u32, iovs: &[Iov]) -> Result<()> {
        debug_assert!(iovs.len() <= MAX_IOVS);
        self.send(&Self::iov_cmd(CMD_PAGES, pipe_idx, iovs), &[])
    }

    /// Bytes spliced, and the bitmap of zero pages the parasite left out.
    pub fn splice_pages_finish(&self) -> Result<(u64, [u64; MAX_BATCH_PAGES / 64])> {
        let mut buf = [0u8; size_of::<PagesReply>()];
        let got = self.recv(CMD_PAGES, &mut buf)?;
        if got >= size_of::<Reply>() {
            let r: Reply = from_bytes(&buf);
            if r.err < 0 {
                return Err(InfectError::Command {
                    pid: self.pid.as_raw(),
                    cmd: CMD_PAGES,
                    errno: Errno::from_raw(-r.err),
                });
            }
        }
        if got < size_of::<PagesReply>() {
            return Err(InfectError::ShortReply {
                pid: self.pid.as_raw(),
                cmd: CMD_PAGES,
                got,
            });
        }
        let r: PagesReply = from_bytes(&buf);
        Ok((r.reply.value as u64, r.skipped))
    }

    /// mprotect ranges inside the task.
    pub fn mprotect(&self, prot: u32, iovs: &[Iov]) -> Result<()> {
        for chunk in iovs.chunks(MAX_IOVS) {
            self.send(&Self::iov_cmd(CMD_MPROTECT, prot, chunk), &[])?;
            self.simple_reply(CMD_MPROTECT)?;
        }
        Ok(())
    }

    /// Read the state only the task can see (signal actions, timers, ...).
    pub fn state(&self, timer_ids: &[i32]) -> Result<Box<StateReply>> {
        let mut cmd = StateCmd {
            hdr: CmdHeader {
                cmd: CMD_STATE,
                arg: timer_ids.len().min(MAX_TIMERS) as u32,
                count: 0,
                _pad: 0,
            },
            timer_ids: [0; MAX_TIMERS],
        };
        for (i, id) in timer_ids.iter().take(MAX_TIMERS).enumerate() {
            cmd.timer_ids[i] = *id;
        }
        self.send(as_bytes(&cmd), &[])?;
        let mut buf = vec![0u8; size_of::<StateReply>() + 64];
        let got = self.recv(CMD_STATE, &mut buf)?;
        if got >= size_of::<Reply>() {
            let r: Reply = from_bytes(&buf);
            if r.err < 0 {
                return Err(InfectError::Command {
                    pid: self.pid.as_raw(),
                    cmd: CMD_STATE,
                    errno: Errno::from_raw(-r.err),
                });
            }
        }
        if got < size_of::<StateReply>() {
            return Err(InfectError::ShortReply {
                pid: self.pid.as_raw(),
                cmd: CMD_STATE,
                got,
            });
        }
        Ok(Box::new(from_bytes(&buf)))
    }

    /// Stop the parasite: FINI, or if it does not answer, interrupt it and
    /// close its descriptors from outside.
    fn stop_parasite(&mut self) -> Result<()> {
        if self.phase != Phase::Running {
            return Ok(());
        }
        let fini = (|| -> Result<()> {
            let hdr = CmdHeader {
                cmd: CMD_FINI,
                ..Default::default()
            };
            self.send(as_bytes(&hdr), &[])?;
            self.simple_reply(CMD_FINI)?;
            // The blob returns into a `jmp .` spin at _cryo_done: stop it
            // there (it may still be closing its socket).
            let done = self.area.map(|a| a.0).unwrap_or(0)
                + self.blob.as_ref().map(|b| b.done as u64).unwrap_or(0);
            for _ in 0..1000 {
                ptrace::interrupt(self.pid).map_err(ptrace_err("INTERRUPT", self.pid))?;
                self.wait_for(Stop::Interrupt)?;
                if ptrace::getregs(self.pid)
                    .map_err(ptrace_err("GETREGS", self.pid))?
                    .rip
                    == done
                {
                    return Ok(());
                }
                ptrace::cont(self.pid, None).map_err(ptrace_err("CONT", self.pid))?;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(InfectError::Timeout {
                pid: self.pid.as_raw(),
                cmd: CMD_FINI,
                secs: 1,
            })
        })();
        self.sock = None;
        self.phase = Phase::Stopped;
        if let Err(e) = fini {
            tracing::warn!(
                pid = self.pid.as_raw(),
                "parasite did not finish cleanly ({e}); stopping it from outside"
            );
            let pid = self.pid;
            ptrace::interrupt(pid).map_err(ptrace_err("INTERRUPT", pid))?;
            loop {
                match waitpid(pid, Some(WaitPidFlag::__WALL)).map_err(ptrace_err("wait", pid))? {
                    WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..) => break,
                    WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                        return Err(InfectError::Gone {
                            pid: pid.as_raw(),
                            status: "exited".into(),
                        })
                    }
                    _ => {}
                }
            }
            // Close what the parasite held: its socket end and the pipes.
            let mut fds = vec![self.task_sock];
            fds.extend(parasite_pipe_fds(pid));
            for fd in fds {
                let _ = self.syscall(libc::SYS_close as u64, [fd as u64, 0, 0, 0, 0, 0]);
            }
        }
        Ok(())
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

/// Descriptors in the task that are pipes made by this cryo process
/// (matched by inode against our own pipes).
fn parasite_pipe_fds(pid: Pid) -> Vec<i32> {
    let ours: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.starts_with("pipe:"))
                .collect()
        })
        .unwrap_or_default();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let l = link.to_string_lossy();
            if ours.iter().any(|o| o == &*l) {
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
