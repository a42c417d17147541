//! cryo's side of a restore once the roots run: follow every task of the
//! tree as it is built (through PTRACE_O_TRACEFORK/TRACECLONE every one
//! is traced), run the barriers on the status pipe, and once every
//! restorer is done and every thread sits on its trap before
//! rt_sigreturn, step each over the sigreturn, remove each bootstrap area
//! and let them go.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use cryo_parasite::*;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::image::TreeImage;
use super::status::record_error;
use super::tree::Plan;
use super::{fault, RestoreError, Result, PAGE, RESTORE_TIMEOUT};
use crate::infect::Victim;

/// A process of the tree as the supervisor follows it: its threads,
/// bootstrap area (start, length), whether its restorer is done.
struct Proc {
    pid: i32,
    threads: Vec<i32>,
    boot: Option<(u64, u64)>,
    done: bool,
}

struct Supervisor<'a> {
    tree: &'a TreeImage,
    plan: &'a Plan,
    root: i32,
    procs: Vec<Proc>,
    /// Every task (thread) of the tree.
    tasks: HashSet<i32>,
    /// Tasks sitting on the restorer's trap before rt_sigreturn.
    trapped: HashSet<i32>,
    created: usize,
    joined: usize,
    status: std::fs::File,
    msg: Vec<u8>,
    eof: bool,
    go1: &'a OwnedFd,
    go2: &'a OwnedFd,
    /// The pids in cryo's namespace of the tasks whose pid there the
    /// kernel chose (`Node::host_free`), by their image pid.
    actual: HashMap<i32, i32>,
    notify: &'a crate::notify::Notify,
}

fn sys_err(pid: i32, what: &'static str) -> impl Fn(Errno) -> RestoreError {
    move |errno| RestoreError::Sys { pid, what, errno }
}

/// Follow the tree until every task is restored; see the module.
/// `roots`: each root's image pid and its pid here.
pub fn supervise(
    tree: &TreeImage,
    plan: &Plan,
    status_r: OwnedFd,
    (go1, go2): (&OwnedFd, &OwnedFd),
    roots: &[(i32, i32)],
    notify: &crate::notify::Notify,
) -> Result<()> {
    let procs: Vec<Proc> = tree
        .procs
        .iter()
        .map(|p| Proc {
            pid: p.pid(),
            threads: p.threads.iter().map(|t| t.tid as i32).collect(),
            boot: None,
            done: false,
        })
        .collect();
    let tasks = procs
        .iter()
        .flat_map(|p| std::iter::once(p.pid).chain(p.threads.iter().copied()))
        .collect();
    let mut s = Supervisor {
        tree,
        plan,
        root: tree.procs[0].pid(),
        procs,
        tasks,
        trapped: HashSet::new(),
        created: 0,
        joined: 0,
        status: std::fs::File::from(status_r),
        msg: Vec::new(),
        eof: false,
        go1,
        go2,
        actual: roots.iter().filter(|(i, a)| i != a).copied().collect(),
        notify,
    };
    let start = Instant::now();
    loop {
        let all_done = s.procs.iter().all(|p| p.done);
        if all_done && s.tasks.iter().all(|t| s.trapped.contains(&s.act(*t))) {
            break;
        }
        s.read_status(all_done)?;
        s.handle_records()?;
        s.reap()?;
        if start.elapsed() > RESTORE_TIMEOUT {
            return Err(RestoreError::Timeout {
                pid: s.root,
                secs: RESTORE_TIMEOUT.as_secs(),
            });
        }
    }
    s.finish()
}

impl Supervisor<'_> {
    /// Task `img`'s pid here.
    fn act(&self, img: i32) -> i32 {
        self.actual.get(&img).copied().unwrap_or(img)
    }

    /// The image pid of the task whose pid here is `t`.
    fn image_of(&self, t: i32) -> i32 {
        self.actual
            .iter()
            .find(|(_, a)| **a == t)
            .map_or(t, |(i, _)| *i)
    }

    /// Task `parent` (its pid here) made `new`: if it is a node whose pid
    /// here the kernel chose, which one (by its pid in its own pid
    /// namespace, NSpid's last).
    fn learn(&mut self, parent: i32, new: i32) {
        let Some(p) = self.plan.index_of(self.image_of(parent)) else {
            return;
        };
        let status = std::fs::read_to_string(format!("/proc/{new}/status")).unwrap_or_default();
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last()?.parse::<i32>().ok());
        let node = &self.plan.nodes[p];
        for &c in &node.children {
            let child = &self.plan.nodes[c];
            if child.host_free && child.tids.last().copied() == inner {
                self.actual.insert(child.pid, new);
                return;
            }
        }
        // A thread of the process.
        if !node.host_free {
            return;
        }
        let img = self.tree.procs.iter().find(|i| i.pid() == node.pid);
        let thread = img
            .into_iter()
            .flat_map(|i| i.threads.iter())
            .find(|t| t.ns_tids.last().map(|&v| v as i32) == inner);
        if let Some(t) = thread {
            self.actual.insert(t.tid as i32, new);
        }
    }

    /// Whatever the tasks wrote to the status pipe (waiting 10 ms at most).
    fn read_status(&mut self, all_done: bool) -> Result<()> {
        let root = self.root;
        if self.eof {
            if !all_done {
                return Err(RestoreError::Died {
                    pid: root,
                    what: "every task closed the status pipe before the restore finished".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
            return Ok(());
        }
        let mut pfd = [PollFd::new(self.status.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut pfd, PollTimeout::from(10u16)).map_err(sys_err(root, "poll"))?;
        if n > 0 {
            let mut buf = [0u8; 4096];
            let got = self.status.read(&mut buf).map_err(|e| RestoreError::Sys {
                pid: root,
                what: "read status",
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            self.eof = got == 0;
            self.msg.extend_from_slice(&buf[..got]);
        }
        Ok(())
    }

    /// The whole records read so far: barriers, bootstrap areas, restorers
    /// done, failures.
    fn handle_records(&mut self) -> Result<()> {
        let rs = std::mem::size_of::<RStatus>();
        let n_nodes = self.plan.nodes.len();
        let write = |fd: &OwnedFd| {
            nix::unistd::write(fd, &vec![b'g'; n_nodes]).map_err(sys_err(self.root, "write"))
        };
        while self.msg.len() >= rs {
            let st: RStatus = crate::infect::from_bytes(&self.msg);
            let pid = st.pid as i32;
            if st.stage == STAGE_CHILD_ERR {
                let len = st.index as usize;
                if self.msg.len() < rs + len {
                    break; // the rest of the message is on its way
                }
                return Err(record_error(&st, &self.msg[rs..rs + len]));
            }
            self.msg.drain(..rs);
            match st.stage {
                STAGE_CREATED => {
                    self.created += 1;
                    if self.created == n_nodes {
                        fault("created")?;
                        write(self.go1)?;
                    }
                }
                STAGE_JOINED => {
                    self.joined += 1;
                    if self.joined == n_nodes {
                        fault("joined")?;
                        self.tell("setup-namespaces")?;
                        crate::sessions::foreground_shell_jobs(self.tree, self.plan);
                        write(self.go2)?;
                    }
                }
                STAGE_BOOT => {
                    if let Some(p) = self.procs.iter_mut().find(|p| p.pid == pid) {
                        p.boot = Some((st.err as u64, st.index as u64 * PAGE));
                    }
                }
                STAGE_DONE => {
                    if let Some(p) = self.procs.iter_mut().find(|p| p.pid == pid) {
                        p.done = true;
                    }
                }
                _ => return Err(record_error(&st, &[])),
            }
        }
        Ok(())
    }

    /// Every ptrace stop and exit waiting to be collected.
    fn reap(&mut self) -> Result<()> {
        loop {
            let st = match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
            ) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => return Ok(()),
                Ok(st) => st,
                Err(errno) => return Err(sys_err(self.root, "waitpid")(errno)),
            };
            match st {
                // Fork and clone events, and each new task's first stop:
                // let them go on.
                WaitStatus::PtraceEvent(t, _, ev) => {
                    let made = [
                        libc::PTRACE_EVENT_FORK,
                        libc::PTRACE_EVENT_VFORK,
                        libc::PTRACE_EVENT_CLONE,
                    ];
                    if made.contains(&ev) && self.plan.nodes.iter().any(|n| n.host_free) {
                        if let Ok(new) = ptrace::getevent(t) {
                            self.learn(t.as_raw(), new as i32);
                        }
                    }
                    let _ = ptrace::cont(t, None);
                }
                // The restorer's trap before rt_sigreturn. A leader writes
                // its success report before it traps, so the report may
                // still be in the pipe: the loop ends only once every
                // process reported too.
                WaitStatus::Stopped(t, Signal::SIGTRAP)
                    if self.tasks.contains(&self.image_of(t.as_raw())) =>
                {
                    self.trapped.insert(t.as_raw());
                }
                // Any other signal (SIGCHLD from helpers and zombies, cryo's
                // page threads' events) goes through.
                WaitStatus::Stopped(t, sig) => {
                    let _ = ptrace::cont(t, Some(sig));
                }
                WaitStatus::Exited(t, _) | WaitStatus::Signaled(t, _, _)
                    if !self.tasks.contains(&self.image_of(t.as_raw())) => {}
                st => {
                    let died = RestoreError::Died {
                        pid: st.pid().map(|p| p.as_raw()).unwrap_or(self.root),
                        what: format!("ended before the restore finished ({st:?})"),
                    };
                    // It may have said why just before it ended.
                    return Err(last_report(&mut self.status, &mut self.msg).unwrap_or(died));
                }
            }
        }
    }

    /// Every task sits on the restorer's trap right before rt_sigreturn:
    /// step each over the sigreturn so it sits in its restored context,
    /// unmap each bootstrap area from its leader, then let every task go
    /// in one sweep. Until that sweep every task is stopped and traced, so
    /// a cryo killed up to there takes the whole tree with it
    /// (PTRACE_O_EXITKILL), and a failure kills it.
    fn finish(self) -> Result<()> {
        let root = self.root;
        fault("trapped")?;
        for &t in self.trapped.iter() {
            step_over_sigreturn(Pid::from_raw(t), root)?;
        }
        fault("stepped")?;
        let mut leaders: Vec<Victim> = Vec::with_capacity(self.procs.len());
        let ready = self.unmap_boot(&mut leaders).and_then(|()| self.sched());
        // Told while every task is still stopped: a runtime records the
        // restored pid (runc), and may refuse.
        let ready = ready.and_then(|()| {
            self.tell("post-restore")?;
            // The lock the dump's network-lock made (runc detaches a
            // container's veth there) goes now.
            self.tell("network-unlock")?;
            self.tell("pre-resume")
        });
        if let Err(e) = ready {
            for v in leaders.iter_mut() {
                let _ = v.kill();
            }
            return Err(e);
        }
        // A process dumped stopped: SIGSTOP queued while every task is
        // still in a ptrace stop, so it stops on its way out of the first
        // detach, before any of its own code runs.
        for img in &self.tree.procs {
            if img.pstree.stopped {
                nix::sys::signal::kill(
                    Pid::from_raw(self.act(img.pid())),
                    nix::sys::signal::Signal::SIGSTOP,
                )
                .map_err(sys_err(img.pid(), "kill(SIGSTOP)"))?;
            }
        }
        for mut v in leaders {
            let pid = v.pid.as_raw();
            v.cure()
                .map_err(|source| RestoreError::Finish { pid, source })?;
        }
        for p in &self.procs {
            for &t in &p.threads {
                ptrace::detach(Pid::from_raw(self.act(t)), None)
                    .map_err(sys_err(root, "PTRACE_DETACH"))?;
            }
        }
        // The tree runs: a listener's failure changes nothing any more.
        if let Err(e) = self.tell("post-resume") {
            tracing::warn!("{e}");
        }
        Ok(())
    }

    /// Tell the listeners of `step`, with the root's pid here.
    fn tell(&self, step: &str) -> Result<()> {
        let pid = self.act(self.root);
        self.notify
            .tell(step, pid)
            .map_err(|what| RestoreError::Notify { pid, what })
    }

    /// Give every thread its scheduling state and every process its
    /// oom_score_adj, from outside, while all are stopped: set last, so
    /// that a real-time policy never runs the restorer.
    fn sched(&self) -> Result<()> {
        let online = crate::sched::online_cpus().map_err(|source| RestoreError::Sched {
            pid: self.root,
            source,
        })?;
        for img in &self.tree.procs {
            let pid = img.pid();
            let err = |source| RestoreError::Sched { pid, source };
            for core in std::iter::once(&img.core).chain(img.threads.iter()) {
                if let Some(s) = &core.sched {
                    crate::sched::restore(self.act(core.tid as i32), s, &online).map_err(err)?;
                }
            }
            if let Some(adj) = img.core.process.as_ref().and_then(|p| p.oom_score_adj) {
                crate::sched::restore_oom_score_adj(self.act(pid), adj).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Unmap each process's bootstrap area (through its leader, kept in
    /// `leaders`, stopped).
    fn unmap_boot(&self, leaders: &mut Vec<Victim>) -> Result<()> {
        for p in &self.procs {
            let pid = p.pid;
            let fin = |source| RestoreError::Finish { pid, source };
            leaders.push(Victim::attach_stopped(Pid::from_raw(self.act(pid))).map_err(fin)?);
            if let (Some((start, len)), Some(v)) = (p.boot, leaders.last_mut()) {
                v.syscall(libc::SYS_munmap as u64, [start, len, 0, 0, 0, 0])
                    .map_err(fin)?;
            }
        }
        fault("unmapped")
    }
}

/// Run task `t` (stopped on its trap) through its rt_sigreturn: its
/// registers are the restored ones at the syscall's exit stop.
fn step_over_sigreturn(t: Pid, root: i32) -> Result<()> {
    let wait_syscall = || -> Result<()> {
        loop {
            match waitpid(t, Some(WaitPidFlag::__WALL)).map_err(sys_err(root, "waitpid"))? {
                WaitStatus::PtraceSyscall(_) => return Ok(()),
                WaitStatus::PtraceEvent(..) => {
                    let _ = ptrace::cont(t, None);
                }
                st => {
                    return Err(RestoreError::Died {
                        pid: t.as_raw(),
                        what: format!("stopped unexpectedly ({st:?}) in its final rt_sigreturn"),
                    })
                }
            }
        }
    };
    ptrace::syscall(t, None).map_err(sys_err(root, "PTRACE_SYSCALL"))?;
    wait_syscall()?; // entry of rt_sigreturn
    ptrace::syscall(t, None).map_err(sys_err(root, "PTRACE_SYSCALL"))?;
    wait_syscall() // exit: registers are the restored ones
}

/// The first failure report in what is left of the status pipe (read
/// until it is empty for a moment), if any: a task that ends on an error
/// writes its report first, which is a better message than its exit.
fn last_report(file: &mut std::fs::File, msg: &mut Vec<u8>) -> Option<RestoreError> {
    loop {
        let mut pfd = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut pfd, PollTimeout::from(50u16)), Ok(n) if n > 0) {
            break;
        }
        let mut buf = [0u8; 4096];
        match file.read(&mut buf) {
            Ok(n) if n > 0 => msg.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let rs = std::mem::size_of::<RStatus>();
    let mut off = 0;
    while msg.len() >= off + rs {
        let st: RStatus = crate::infect::from_bytes(&msg[off..]);
        if st.stage == STAGE_CHILD_ERR {
            let text = msg.get(off + rs..off + rs + st.index as usize)?;
            return Some(record_error(&st, text));
        }
        if !matches!(
            st.stage,
            STAGE_CREATED | STAGE_JOINED | STAGE_BOOT | STAGE_DONE
        ) {
            return Some(record_error(&st, &[]));
        }
        off += rs;
    }
    None
}
