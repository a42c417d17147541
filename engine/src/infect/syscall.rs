//! Single system calls run inside a stopped task: the injection site
//! (a `syscall; jmp .` word written over executable code, put back after
//! each call), the wait for the call's end, and reading and writing the
//! task's memory; the syscalls cryo needs this way (userfaultfd, a
//! thread's altstack and tid address).

#![forbid(unsafe_code)]

use cryo_parasite::*;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use std::os::fd::OwnedFd;

use super::*;

impl Victim {
    pub(super) fn find_inject_addr(&mut self) -> Result<u64> {
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

    /// Wait for the next stop of `want` kind, letting group stops go (a
    /// stop signal that arrives meanwhile is held back and raised again
    /// when the task is cured).
    pub(super) fn wait_for(&self, want: Stop) -> Result<()> {
        let pid = self.pid;
        // Resuming for a syscall stop must keep syscall stops on.
        let resume = || match want {
            Stop::Syscall => ptrace::syscall(pid, None).map_err(ptrace_err("SYSCALL", pid)),
            Stop::Interrupt => ptrace::cont(pid, None).map_err(ptrace_err("CONT", pid)),
        };
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)).map_err(ptrace_err("wait", pid))? {
                WaitStatus::PtraceSyscall(_) if want == Stop::Syscall => return Ok(()),
                WaitStatus::PtraceEvent(_, _, ev)
                    if want == Stop::Interrupt && ev == libc::PTRACE_EVENT_STOP =>
                {
                    return Ok(())
                }
                WaitStatus::PtraceEvent(..) => {
                    // A group stop, or the trap of a stopped task's
                    // interrupt: keep the task going.
                    resume()?;
                }
                WaitStatus::Stopped(_, sig) if is_stop_signal(sig) => {
                    self.held_stop.set(true);
                    resume()?;
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
    pub(super) fn spin_and_stop(&self) -> Result<()> {
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
        fault_step(pid, &format!("injecting syscall {nr}"))?;
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
    pub(super) fn unpatch(&mut self) -> Result<()> {
        if self.patched {
            let (at, orig) = self.injection_site()?;
            ptrace::write(self.pid, at as _, orig as i64)
                .map_err(ptrace_err("POKEDATA", self.pid))?;
            self.patched = false;
        }
        Ok(())
    }

    pub(super) fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
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

    pub(super) fn read_mem(&self, addr: u64, out: &mut [u8]) -> Result<()> {
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
}
