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
        self.send(area.0, area.1);
    }

    fn send(&self, a: u64, b: u64) {
        if let Some(tx) = &self.tx {
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(&a.to_ne_bytes());
            buf[8..].copy_from_slice(&b.to_ne_bytes());
            let _ = nix::unistd::write(tx, &buf);
        }
    }
}

impl Drop for Guard {
    /// cryo is done with the task (cured or killed): dismiss the guardian.
    fn drop(&mut self) {
        self.send(0, 0);
        self.tx = None;
        let _ = waitpid(self.child, None);
    }
}

fn guardian(pid: Pid, rx: OwnedFd) {
    let mut f = std::fs::File::from(rx);
    let mut area = None;
    loop {
        let mut buf = [0u8; 16];
        match f.read_exact(&mut buf) {
            Ok(()) => {
                let a = u64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
                let b = u64::from_ne_bytes(buf[8..].try_into().unwrap_or_default());
                if a == 0 && b == 0 {
                    return; // dismissed
                }
                area = Some((a, b));
            }
            Err(_) => break, // cryo died
        }
    }
    let _ = f.as_raw_fd();
    let Some((addr, len)) = area else { return };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        // Once cryo's ptrace link is gone we can seize; once the parasite
        // has returned through its frame, the task runs its own code.
        if let Ok(mut v) = Victim::seize(pid) {
            let rip = v.regs().rip;
            if rip < addr || rip >= addr + len {
                if area_mapped(pid, addr) {
                    let _ = v.syscall(libc::SYS_munmap as u64, [addr, len, 0, 0, 0, 0]);
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
