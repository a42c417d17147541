//! The guardian: a small process forked from cryo before any task is
//! seized. If cryo dies while the parasite is inside a task (SIGKILL,
//! OOM), the parasite sees its control socket close and returns the task
//! to its saved context by itself, but its own mapping stays behind; the
//! guardian notices cryo's death (its pipe closes), waits for the task to
//! leave the parasite, and removes the mapping, so the task ends up
//! exactly as it was. One guardian covers every task (thread) of a dump:
//! each record names the tid it is about.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use super::{InfectError, Victim};
use crate::sigframe::Regs;

const MSG_DISMISS: u64 = 0;
pub(super) const MSG_AREA: u64 = 1;
const MSG_MASK: u64 = 2;
/// Followed by `a` bytes: registers, injection site and original word,
/// then the XSAVE area.
const MSG_STATE: u64 = 3;
const MSG_DONE: u64 = 4;
/// Followed by `a` bytes: the task's descriptor numbers at the seize (i32).
const MSG_FDS: u64 = 6;
/// The syscall number cryo is about to inject (`a`).
pub(super) const MSG_INJECT: u64 = 5;
/// cryo is done with this task.
const MSG_RELEASE: u64 = 7;

/// One guardian record: kind, the tid it is about, two words.
pub(super) fn record(kind: u64, tid: Pid, a: u64, b: u64) -> [u8; 32] {
    let mut buf = [0u8; 32];
    buf[..8].copy_from_slice(&kind.to_ne_bytes());
    buf[8..16].copy_from_slice(&(tid.as_raw() as u64).to_ne_bytes());
    buf[16..24].copy_from_slice(&a.to_ne_bytes());
    buf[24..].copy_from_slice(&b.to_ne_bytes());
    buf
}

/// Signals the kernel never lets a task block, and SIGTRAP, which it
/// unblocks itself when an injected int3 fires.
const UNBLOCKABLE: u64 = (1 << (9 - 1)) | (1 << (19 - 1)) | (1 << (5 - 1));

pub struct Guard {
    tx: Option<OwnedFd>,
    child: Pid,
}

impl Guard {
    /// Fork the guardian for the tasks of a dump (`pid` names the dump in
    /// errors). Must be called while cryo is single-threaded.
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
                guardian(rx);
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

    /// Tell the guardian where the parasite lives in task `tid`.
    pub fn arm(&self, tid: Pid, area: (u64, u64)) {
        self.send(MSG_AREA, tid, area.0, area.1);
    }

    /// Tell the guardian task `tid`'s own registers, XSAVE area and signal
    /// mask as saved at the seize, and where cryo runs injected syscalls
    /// (with the original word there), so it can put the task back if cryo
    /// dies half way through an injection.
    pub fn arm_state(&self, tid: Pid, regs: &Regs, xstate: &[u8], mask: u64, site: (u64, u64)) {
        self.send(MSG_MASK, tid, mask, 0);
        let mut payload = super::as_bytes(regs).to_vec();
        payload.extend_from_slice(&site.0.to_ne_bytes());
        payload.extend_from_slice(&site.1.to_ne_bytes());
        payload.extend_from_slice(xstate);
        self.send(MSG_STATE, tid, payload.len() as u64, 0);
        if let Some(tx) = &self.tx {
            let _ = nix::unistd::write(tx, &payload);
        }
        // The descriptors the task has now, while it is stopped: any other
        // one found later in a task stuck in cryo's code is cryo's.
        let fds: Vec<u8> = std::fs::read_dir(format!("/proc/{tid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .flat_map(|fd| fd.to_ne_bytes())
                    .collect()
            })
            .unwrap_or_default();
        self.send(MSG_FDS, tid, fds.len() as u64, 0);
        if let Some(tx) = &self.tx {
            let _ = nix::unistd::write(tx, &fds);
        }
    }

    /// Tell the guardian where the parasite's final spin is in task `tid`.
    pub fn arm_done(&self, tid: Pid, addr: u64) {
        self.send(MSG_DONE, tid, addr, 0);
    }

    /// Tell the guardian cryo is done with task `tid` (cured, or detached
    /// untouched): it must not touch it any more.
    pub fn release(&self, tid: Pid) {
        self.send(MSG_RELEASE, tid, 0, 0);
    }

    fn send(&self, kind: u64, tid: Pid, a: u64, b: u64) {
        if let Some(tx) = &self.tx {
            let _ = nix::unistd::write(tx, &record(kind, tid, a, b));
        }
    }

    /// A second handle on the guardian's pipe for the victim, which tells
    /// it every syscall it injects.
    pub fn notifier(&self) -> Option<OwnedFd> {
        self.tx.as_ref().and_then(|t| t.try_clone().ok())
    }
}

impl Drop for Guard {
    /// cryo is done with the task (cured or killed): dismiss the guardian.
    fn drop(&mut self) {
        self.send(MSG_DISMISS, Pid::from_raw(0), 0, 0);
        self.tx = None;
        let _ = waitpid(self.child, None);
    }
}

/// What the guardian knows of the task.
#[derive(Default)]
struct Known {
    area: Option<(u64, u64)>,
    mask: Option<u64>,
    /// Registers and XSAVE area at the seize, and the injection site.
    state: Option<(Regs, Vec<u8>, (u64, u64))>,
    done: Option<u64>,
    /// The last syscall cryo injected.
    injected: Option<u64>,
    /// Descriptors the task had at the seize.
    fds: Option<Vec<i32>>,
}

fn guardian(rx: OwnedFd) {
    // Test hooks are for cryo itself: the guardian must never pause in one.
    std::env::remove_var("CRYO_FAULT");
    let mut f = std::fs::File::from(rx);
    let mut tasks: BTreeMap<i32, Known> = BTreeMap::new();
    loop {
        let mut buf = [0u8; 32];
        if f.read_exact(&mut buf).is_err() {
            break; // cryo died
        }
        let word =
            |i: usize| u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let kind = word(0);
        if kind == MSG_DISMISS {
            return; // cryo finished with every task
        }
        let tid = word(1) as i32;
        if kind == MSG_RELEASE {
            tasks.remove(&tid);
            continue;
        }
        let k = tasks.entry(tid).or_default();
        match kind {
            MSG_AREA => k.area = Some((word(2), word(3))),
            MSG_MASK => k.mask = Some(word(2)),
            MSG_DONE => k.done = Some(word(2)),
            MSG_INJECT => k.injected = Some(word(2)),
            MSG_FDS => {
                let mut payload = vec![0u8; word(2) as usize];
                if f.read_exact(&mut payload).is_err() {
                    break;
                }
                k.fds = Some(
                    payload
                        .chunks_exact(4)
                        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                );
            }
            MSG_STATE => {
                let mut payload = vec![0u8; word(2) as usize];
                if f.read_exact(&mut payload).is_err() {
                    break;
                }
                let n = std::mem::size_of::<Regs>();
                if payload.len() >= n + 16 {
                    let regs: Regs = super::from_bytes(&payload);
                    let at = u64::from_ne_bytes(payload[n..n + 8].try_into().unwrap_or_default());
                    let orig =
                        u64::from_ne_bytes(payload[n + 8..n + 16].try_into().unwrap_or_default());
                    k.state = Some((regs, payload[n + 16..].to_vec(), (at, orig)));
                }
            }
            _ => return, // not a record cryo writes: stop rather than guess
        }
    }
    tasks.retain(|_, k| k.area.is_some() || k.mask.is_some());
    let start = Instant::now();
    while !tasks.is_empty() && start.elapsed() < Duration::from_secs(10) {
        tasks.retain(|&tid, k| {
            let pid = Pid::from_raw(tid);
            // Once cryo's ptrace link is gone we can seize.
            match Victim::seize(pid) {
                Ok(mut v) => {
                    tracing::debug!(tid, rip = v.regs().rip, "guardian: seized");
                    let done = repair(pid, &mut v, k);
                    // Not done: the parasite is still on its way out; try
                    // again shortly.
                    let _ = v.cure();
                    !done
                }
                Err(e) => {
                    tracing::debug!(tid, "guardian: seize: {e}");
                    std::path::Path::new(&format!("/proc/{tid}")).exists()
                }
            }
        });
        if !tasks.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Put the seized task back as it was before cryo touched it. Returns
/// false while the parasite is still running (it returns the task to its
/// context by itself once it sees its socket close).
fn repair(pid: Pid, v: &mut Victim, k: &Known) -> bool {
    let rip = v.regs().rip;
    let spinning_done = k.done == Some(rip);
    let in_injection = k
        .state
        .as_ref()
        .is_some_and(|(_, _, (at, _))| rip >= *at && rip < at + 4);
    let in_parasite = k
        .area
        .is_some_and(|(addr, len)| rip >= addr && rip < addr + len);
    if in_parasite && !spinning_done {
        return false;
    }
    // An mmap cryo injected but never saw return: the parasite area,
    // which no message named yet.
    let stray_map = {
        let r = v.regs();
        (in_injection && k.injected == Some(libc::SYS_mmap as u64) && (r.rax as i64) > 0)
            .then_some(r.rax)
    };
    if in_injection || spinning_done {
        // Stopped in cryo's own code: restore the code word, then the
        // saved registers, XSAVE area and mask.
        if let Some((regs, xstate, (at, orig))) = &k.state {
            let _ = nix::sys::ptrace::write(pid, *at as _, *orig as i64);
            v.set_saved_state(*regs, xstate.clone());
        }
        if let Some(m) = k.mask {
            v.set_saved_mask(m);
        }
        // No code of the task ran since cryo stopped it: descriptors it
        // did not have then are cryo's (the control socket pair).
        if let Some(before) = &k.fds {
            for fd in task_fds(pid).into_iter().filter(|fd| !before.contains(fd)) {
                let _ = v.syscall(libc::SYS_close as u64, [fd as u64, 0, 0, 0, 0, 0]);
            }
        }
    } else if let Some(m) = k.mask {
        // Still every signal blocked, as cryo left it: put the task's own
        // mask back.
        if v.sigmask() | UNBLOCKABLE == u64::MAX {
            v.set_saved_mask(m);
        }
    }
    let area = k
        .area
        .or_else(|| stray_map.and_then(|addr| Some((addr, mapping_len(pid, addr)?))));
    if let Some((addr, len)) = area {
        if area_mapped(pid, addr) {
            let _ = v.syscall(libc::SYS_munmap as u64, [addr, len, 0, 0, 0, 0]);
        }
    }
    true
}

fn task_fds(pid: Pid) -> Vec<i32> {
    crate::proc::fd_numbers(pid.as_raw())
}

/// Length of the mapping that starts at `addr` in the task.
fn mapping_len(pid: Pid, addr: u64) -> Option<u64> {
    crate::proc::read_maps(&pid.to_string())
        .into_iter()
        .find(|m| m.start == addr)
        .map(|m| m.end - m.start)
}

fn area_mapped(pid: Pid, addr: u64) -> bool {
    mapping_len(pid, addr).is_some()
}
