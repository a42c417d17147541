//! The guardian: a small process forked from cryo before a task is
//! infected. If cryo dies while the parasite is inside the task (SIGKILL,
//! OOM), the parasite sees its control socket close and returns the task
//! to its saved context by itself, but its own mapping stays behind; the
//! guardian notices cryo's death (its pipe closes), waits for the task to
//! leave the parasite, and removes the mapping, so the task ends up
//! exactly as it was.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use super::{InfectError, Victim};

const MSG_DISMISS: u64 = 0;
const MSG_AREA: u64 = 1;
const MSG_MASK: u64 = 2;

/// Signals the kernel never lets a task block, and SIGTRAP, which it
/// unblocks itself when an injected int3 fires.
const UNBLOCKABLE: u64 = (1 << (9 - 1)) | (1 << (19 - 1)) | (1 << (5 - 1));

pub struct Guard {
    tx: Option<OwnedFd>,
    child: Pid,
}

impl Guard {
    /// Fork the guardian for task `pid`. Must be called while cryo is
    /// single-threaded.
    pub fn spawn(pid: Pid) -> Result<Guard, InfectError> {
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| {
            InfectError::Channel {
                pid: pid.as_raw(),
                what: "guardian pipe",
                errno,
            }
        })?;
        // SAFETY: the caller guarantees cryo is single-threaded here, so
        // the child can use the allocator and the rest of the process
        // state safely; it only runs `guardian` and exits.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(tx);
                let _ = nix::unistd::setsid();
                guardian(pid, rx);
                // SAFETY: _exit ends the child without running the
                // parent's atexit handlers or flushing its buffers.
                unsafe { libc::_exit(0) }
            }
            Ok(ForkResult::Parent { child }) => Ok(Guard {
                tx: Some(tx),
                child,
            }),
            Err(errno) => Err(InfectError::Channel {
                pid: pid.as_raw(),
                what: "forking the guardian",
                errno,
            }),
        }
    }

    /// Tell the guardian where the parasite lives in the task.
    pub fn arm(&self, area: (u64, u64)) {
        self.send(MSG_AREA, area.0, area.1);
    }

    /// Tell the guardian the task's own signal mask (cryo blocks every
    /// signal while it works on the task).
    pub fn arm_mask(&self, mask: u64) {
        self.send(MSG_MASK, mask, 0);
    }

    fn send(&self, kind: u64, a: u64, b: u64) {
        if let Some(tx) = &self.tx {
            let mut buf = [0u8; 24];
            buf[..8].copy_from_slice(&kind.to_ne_bytes());
            buf[8..16].copy_from_slice(&a.to_ne_bytes());
            buf[16..].copy_from_slice(&b.to_ne_bytes());
            let _ = nix::unistd::write(tx, &buf);
        }
    }
}

impl Drop for Guard {
    /// cryo is done with the task (cured or killed): dismiss the guardian.
    fn drop(&mut self) {
        self.send(MSG_DISMISS, 0, 0);
        self.tx = None;
        let _ = waitpid(self.child, None);
    }
}

fn guardian(pid: Pid, rx: OwnedFd) {
    let mut f = std::fs::File::from(rx);
    let mut area = None;
    let mut mask = None;
    loop {
        let mut buf = [0u8; 24];
        match f.read_exact(&mut buf) {
            Ok(()) => {
                let word = |i: usize| {
                    u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or_default())
                };
                match word(0) {
                    MSG_AREA => area = Some((word(1), word(2))),
                    MSG_MASK => mask = Some(word(1)),
                    _ => return, // dismissed: cryo finished with the task
                }
            }
            Err(_) => break, // cryo died
        }
    }
    let _ = f.as_raw_fd();
    if area.is_none() && mask.is_none() {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        // Once cryo's ptrace link is gone we can seize; once the parasite
        // has returned through its frame, the task runs its own code.
        if let Ok(mut v) = Victim::seize(pid) {
            let rip = v.regs().rip;
            let in_parasite = area.is_some_and(|(addr, len)| rip >= addr && rip < addr + len);
            if !in_parasite {
                if let Some((addr, len)) = area {
                    if area_mapped(pid, addr) {
                        let _ = v.syscall(libc::SYS_munmap as u64, [addr, len, 0, 0, 0, 0]);
                    }
                }
                // Still every signal blocked, as cryo left it: put the
                // task's own mask back.
                if let Some(m) = mask {
                    if v.sigmask() | UNBLOCKABLE == u64::MAX {
                        v.set_saved_mask(m);
                    }
                }
                let _ = v.cure();
                return;
            }
            let _ = v.cure();
        } else if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn area_mapped(pid: Pid, addr: u64) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let key = format!("{addr:x}-");
    text.lines().any(|l| l.starts_with(&key))
}
