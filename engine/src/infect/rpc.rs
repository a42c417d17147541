//! The parasite itself: mapping and starting the blob in the task, the
//! command socket to it, every command cryo sends, and stopping it.

#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use cryo_parasite::*;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::ptrace;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use super::*;
use blob::{Blob, PARASITE_ELF};

impl Victim {
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
        crate::sigframe::apply_syscall_restart(&mut regs);
        let fp_at = args_at + OFF_FPSTATE;
        let fp = crate::sigframe::build_fpstate(&self.saved_xstate);
        let frame = crate::sigframe::build_frame(&regs, self.saved_mask, &altstack, fp_at);
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

    pub(super) fn sock_fd(&self) -> Result<RawFd> {
        self.sock
            .as_ref()
            .map(|s| s.as_raw_fd())
            .ok_or(InfectError::Channel {
                pid: self.pid.as_raw(),
                what: "no control socket",
                errno: Errno::ENOTCONN,
            })
    }

    pub(super) fn send(&self, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
        fault_step(self.pid, "a parasite command")?;
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
    pub(super) fn recv(&self, cmd: u32, out: &mut [u8]) -> Result<usize> {
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
                // A reply to an earlier command that cryo gave up waiting
                // for (a page batch whose pipe it closed after an error)
                // still sits in the socket: skip it.
                let answers = out[..got.min(out.len())]
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes);
                if answers.is_some_and(|c| c != cmd) {
                    tracing::debug!(pid = pid.as_raw(), cmd, "skipping a stale parasite reply");
                    continue;
                }
                return Ok(got);
            }
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                Ok(WaitStatus::PtraceEvent(..)) => {
                    let _ = ptrace::cont(pid, None);
                }
                Ok(WaitStatus::Stopped(_, sig)) if is_stop_signal(sig) => {
                    self.held_stop.set(true);
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
                self.silent.set(Some(cmd));
                return Err(InfectError::Timeout {
                    pid: pid.as_raw(),
                    cmd,
                    secs: COMMAND_TIMEOUT.as_secs(),
                });
            }
        }
    }

    pub(super) fn simple_reply(&self, cmd: u32) -> Result<i64> {
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
        for fd in fds {
            if let Ok(l) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
                self.sent_links.push(l.to_string_lossy().into_owned());
            }
        }
        self.send(as_bytes(&hdr), fds)?;
        let total = self.simple_reply(CMD_RECV_FDS)? as u32;
        let first = self.sent_fds;
        self.sent_fds = total;
        Ok(first)
    }

    pub(super) fn iov_cmd(cmd: u32, arg: u32, iovs: &[Iov]) -> Vec<u8> {
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
        self.check_reply(
            CMD_PAGES,
            &buf[..got.min(buf.len())],
            size_of::<PagesReply>(),
        )?;
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

    /// A reply of `want` bytes to `cmd`: an error the parasite reports, or
    /// a reply too short, is an error naming the command.
    fn check_reply(&self, cmd: u32, reply: &[u8], want: usize) -> Result<()> {
        let pid = self.pid.as_raw();
        if reply.len() >= size_of::<Reply>() {
            let r: Reply = from_bytes(reply);
            if r.err < 0 {
                let errno = Errno::from_raw(-r.err);
                return Err(InfectError::Command { pid, cmd, errno });
            }
        }
        if reply.len() < want {
            let got = reply.len();
            return Err(InfectError::ShortReply { pid, cmd, got });
        }
        Ok(())
    }

    /// Make the mapping `iov` (protection `prot`) readable for the page
    /// transfer; its protection goes back with [`Victim::put_back_protections`]
    /// or, if that never happens, when the task is cured.
    pub fn make_readable(&mut self, prot: u32, iov: Iov) -> Result<()> {
        self.reprotect.push((iov.base, iov.len, prot));
        self.mprotect(prot | libc::PROT_READ as u32, std::slice::from_ref(&iov))
    }

    /// Put back the protection of every mapping made readable.
    pub fn put_back_protections(&mut self) -> Result<()> {
        while let Some(&(base, len, prot)) = self.reprotect.last() {
            self.mprotect(prot, &[Iov { base, len }])?;
            self.reprotect.pop();
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
        self.check_reply(
            CMD_STATE,
            &buf[..got.min(buf.len())],
            size_of::<StateReply>(),
        )?;
        Ok(Box::new(from_bytes(&buf)))
    }

    /// Test hook: a command the parasite never answers (CRYO_FAULT
    /// `fail-silent-parasite`), to show that the dump then fails within
    /// the command timeout and leaves the task as it was.
    pub fn test_silent(&self) -> Result<()> {
        let hdr = CmdHeader {
            cmd: CMD_TEST_SILENT,
            ..Default::default()
        };
        self.send(as_bytes(&hdr), &[])?;
        self.simple_reply(CMD_TEST_SILENT).map(drop)
    }

    /// Stop the parasite: FINI, or if it does not answer, interrupt it and
    /// close its descriptors from outside.
    pub(super) fn stop_parasite(&mut self) -> Result<()> {
        if self.phase != Phase::Running {
            return Ok(());
        }
        let fini = (|| -> Result<()> {
            if let Some(cmd) = self.silent.get() {
                // It would not answer FINI either.
                return Err(InfectError::Timeout {
                    pid: self.pid.as_raw(),
                    cmd,
                    secs: COMMAND_TIMEOUT.as_secs(),
                });
            }
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
        self.phase = Phase::Stopped;
        if let Err(e) = fini {
            tracing::warn!(
                pid = self.pid.as_raw(),
                "parasite did not finish cleanly ({e}); stopping it from outside"
            );
            let pid = self.pid;
            ptrace::interrupt(pid).map_err(ptrace_err("INTERRUPT", pid))?;
            // Not a blocking wait: a task killed from outside meanwhile may
            // be a zombie leader whose exit is reported only once its other
            // threads (ours to reap) are gone.
            let gone = || InfectError::Gone {
                pid: pid.as_raw(),
                status: "exited".into(),
            };
            loop {
                let flags = WaitPidFlag::__WALL | WaitPidFlag::WNOHANG;
                match waitpid(pid, Some(flags)).map_err(ptrace_err("wait", pid))? {
                    WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..) => break,
                    WaitStatus::Exited(..) | WaitStatus::Signaled(..) => return Err(gone()),
                    WaitStatus::StillAlive => {
                        let state = crate::pstree::stat(pid.as_raw()).map(|s| s.state);
                        if matches!(state, None | Some('Z' | 'X')) {
                            return Err(gone());
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    _ => {}
                }
            }
            // Only now close cryo's end of the control socket: the parasite
            // takes a closed socket to mean that cryo died and returns into
            // the task's own context by itself, and if it did that before the
            // stop, the cure would put the task back to the registers of the
            // seize while its memory had moved on.
            self.sock = None;
            self.adopt_own_context()?;
            // Close what the parasite held: its socket end and the pipes.
            let mut fds = vec![self.task_sock];
            fds.extend(fds_linked_to(pid, &self.sent_links));
            for fd in fds {
                let _ = self.syscall(libc::SYS_close as u64, [fd as u64, 0, 0, 0, 0, 0]);
            }
        }
        self.sock = None;
        Ok(())
    }

    /// The task was stopped from outside while the parasite was thought to
    /// run: if it is not in the parasite's mapping, the parasite had
    /// already returned into the task's own context (through its prepared
    /// sigreturn frame), so what the task holds now is its state, and the
    /// cure must put back that, not the state of the seize.
    fn adopt_own_context(&mut self) -> Result<()> {
        let pid = self.pid;
        let regs = ptrace::getregs(pid).map_err(ptrace_err("GETREGS", pid))?;
        let rip = regs.rip;
        let in_parasite = self
            .area
            .is_some_and(|(start, len)| (start..start + len).contains(&rip));
        let at_spin = self.inject_at != 0 && (self.inject_at..=self.inject_at + 2).contains(&rip);
        if in_parasite || at_spin {
            return Ok(());
        }
        tracing::warn!(
            pid = pid.as_raw(),
            "the parasite had already returned the task to its own context; keeping that"
        );
        self.saved = regs;
        self.saved_xstate = sys::get_xstate(pid)?;
        self.saved_mask = sys::get_sigmask(pid)?;
        sys::set_sigmask(pid, !0u64)?;
        Ok(())
    }
}
