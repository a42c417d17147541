//! The new tasks of a restore, from their creation (clone3 with the
//! dumped pid, by the task that is to be their parent) to the hand-off:
//! each makes its session or group and its memory (which its children
//! inherit), creates its children, waits on the
//! barriers until the whole tree exists and every group is in place, then
//! becomes what it was: a helper exits, a zombie exits with its dumped
//! status, a task prepares itself ([`super::task`]) and jumps into the
//! restorer.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use cryo_image::PageReader;
use cryo_parasite::{STAGE_CREATED, STAGE_JOINED};
use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag};
use nix::unistd::Pid;

use super::image::TreeImage;
use super::status::{read_go, report, report_error_and_exit, Never, STATUS_FD};
use super::tree::{Node, NodeKind, Plan};
use crate::files::table::SharedTable;
use crate::sessions;
use crate::sys::mem::SharedCounters;

/// What every node of the tree gets from cryo across its creation.
pub struct NodeCtx<'a> {
    pub tree: &'a TreeImage,
    pub readers: &'a [PageReader],
    /// The parent images' pages, opened by cryo (each task reads its own
    /// copy, after the fork).
    pub chain: &'a std::cell::RefCell<crate::mem::incremental::Chain>,
    pub plan: &'a Plan,
    /// The shared anonymous objects (shmem files) by their dumped id.
    pub shm: &'a HashMap<u64, RawFd>,
    /// Every open file description of the tree, by its id in files.img.
    pub files: &'a HashMap<u32, RawFd>,
    /// The master of every pty of the tree, by its index.
    pub pty_masters: &'a HashMap<u32, RawFd>,
    pub status_w: RawFd,
    /// How much later than asked this kernel fires a CPU-time itimer.
    pub cpu_timer_slack_us: u64,
    /// Read ends of the three barriers: traced (roots), all created, all
    /// in their groups.
    pub go: [RawFd; 3],
    /// Where each dumped cgroup (hierarchy, path) is here.
    pub cgroups: &'a crate::cgroup::Targets,
    /// The namespaces cryo made before the tasks.
    pub ns_made: &'a super::NsMade,
    /// The roots are children of cryo's parent (RestoreOptions::sibling).
    pub sibling: bool,
}

/// The memory of the task that creates a node, when it is the node's
/// dumped parent: its image's index and its premap area (inherited).
pub type Parent<'a> = Option<(usize, &'a crate::mem::restore::Premap)>;

/// What a task was created sharing with the task that created it: its
/// descriptor table (CLONE_FILES) and its filesystem information
/// (CLONE_FS), with what orders their use.
#[derive(Clone, Copy, Default)]
pub struct Sharing {
    pub table: Option<SharedTable>,
    pub fs: Option<SharedCounters>,
}

/// A new task of the tree, running cryo's code with its dumped pid.
/// Never returns.
pub fn node_main(ctx: &NodeCtx, idx: usize, parent: Parent, sharing: Sharing) -> ! {
    let node = &ctx.plan.nodes[idx];
    STATUS_FD.store(ctx.status_w, Ordering::Relaxed);
    match node_setup(ctx, idx, parent, sharing) {
        Ok(never) => match never {},
        Err(msg) => report_error_and_exit(node.pid, &msg),
    }
}

/// Before its children: die with the task that made it while the tree is
/// built (cryo itself kills the roots; a helper's children outlive it on
/// purpose, and the restorer sets the dumped value at the end), the
/// subreaper flag, its session or group.
fn setup_self(ctx: &NodeCtx, node: &Node) -> Result<(), String> {
    let os = |what: &'static str| move |e| format!("{what}: {}", std::io::Error::from(e));
    let creator_is_helper = node
        .creator
        .is_some_and(|c| ctx.plan.nodes[c].kind == NodeKind::Helper);
    if !creator_is_helper {
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
        // The init of a new pid namespace has no parent inside it (getppid
        // is 0 there): it asks /proc, which shows cryo's view.
        let creator = node.creator.map(|c| &ctx.plan.nodes[c]);
        let alive = match creator {
            None => true,
            Some(c) if node.new_pid_ns(c.depth()) => {
                crate::pstree::stat(node.pid).is_some_and(|s| s.ppid as i32 == c.pid)
            }
            Some(c) => nix::unistd::getppid().as_raw() == c.pid_at(node.depth()),
        };
        if !alive {
            return Err("the task creating this one died".into());
        }
    }
    if node.creator.is_none() {
        read_go(ctx.go[0])?;
    }
    if node.subreaper {
        nix::sys::prctl::set_child_subreaper(true).map_err(os("PR_SET_CHILD_SUBREAPER"))?;
    }
    sessions::enter(ctx.tree, ctx.pty_masters, node)
}

/// What a task does about its descriptor table, or its filesystem
/// information (`T`: what orders the tasks sharing it).
#[derive(Clone, Copy)]
pub enum Role<T> {
    /// Its own.
    Own,
    /// Makes the one it shares with this many other tasks.
    Builder(T, u32),
    /// Shares one another task makes.
    Member(T),
}

impl<T: Copy> Role<T> {
    fn sync(&self) -> Option<T> {
        match self {
            Role::Own => None,
            Role::Builder(t, _) | Role::Member(t) => Some(*t),
        }
    }
}

pub type TableRole = Role<SharedTable>;
pub type FsRole = Role<SharedCounters>;

fn node_setup(
    ctx: &NodeCtx,
    idx: usize,
    parent: Parent,
    inherited: Sharing,
) -> Result<Never, String> {
    let node = &ctx.plan.nodes[idx];
    let pid = node.pid;
    setup_self(ctx, node)?;
    // A task makes its memory before its children, which inherit it: the
    // pages they still shared copy-on-write with it stay one frame.
    let memory = match node.kind {
        NodeKind::Task(i) => Some((
            i,
            super::task::prepare_memory(ctx, i, ctx.status_w, parent)?,
        )),
        _ => None,
    };
    // Its descriptor table, if shared: made here by its first task, before
    // any other exists.
    let role = match (inherited.table, sharers(ctx, idx, shares_files)) {
        (Some(t), _) => TableRole::Member(t),
        (None, 0) => TableRole::Own,
        (None, n) => {
            let max_fd = match node.kind {
                NodeKind::Task(i) => ctx.tree.procs[i].fds.iter().map(|f| f.fd as RawFd).max(),
                _ => None,
            };
            TableRole::Builder(SharedTable::new(max_fd.unwrap_or(2))?, n)
        }
    };
    let table = role.sync();
    // Its filesystem information, if shared: the first task of it enters
    // the root (chroot) once the others have opened every path of cryo's.
    let fs_role = match (inherited.fs, sharers(ctx, idx, shares_fs)) {
        (Some(c), _) => FsRole::Member(c),
        (None, 0) => FsRole::Own,
        (None, n) => FsRole::Builder(
            SharedCounters::new()
                .map_err(|e| format!("a page shared with its CLONE_FS children: {e}"))?,
            n,
        ),
    };
    let fs = fs_role.sync();
    for &c in &node.children {
        let child = &ctx.plan.nodes[c];
        let its_parent = memory.as_ref().and_then(|(i, m)| {
            let dumped_parent = match child.kind {
                NodeKind::Task(k) => ctx.tree.procs[k].pstree.ppid == ctx.tree.procs[*i].pstree.pid,
                _ => false,
            };
            dumped_parent.then(|| (*i, m.premap()))
        });
        let share_fs = shares_fs(ctx, node, child);
        let share_files = shares_files(ctx, node, child);
        let set_tid = child.set_tid();
        let how = crate::sys::proc::NewTask {
            set_tid: &set_tid,
            exit_signal: child.exit_signal,
            share_fs,
            share_files,
            new_pid_ns: child.new_pid_ns(node.depth()),
            sibling: false,
        };
        match crate::sys::proc::fork_with_pid(&how) {
            Ok(0) => {
                let sharing = Sharing {
                    table: table.filter(|_| share_files),
                    fs: fs.filter(|_| share_fs),
                };
                node_main(ctx, c, its_parent, sharing)
            }
            Ok(_) => {}
            Err(errno) => {
                let holder = super::pid_holder(child.pid).unwrap_or_default();
                return Err(format!(
                    "creating task {} (clone3 set_tid): {errno} {holder}",
                    child.pid
                ));
            }
        }
    }
    report(ctx.status_w, STAGE_CREATED, pid);
    read_go(ctx.go[1])?;
    let g = node.join_pgid;
    let pgid = ctx
        .tree
        .pids
        .seen_at(g as u32, node.depth())
        .map_err(|e| format!("its process group {g}: {e}"))?;
    sessions::join_group(pgid as i32)?;
    report(ctx.status_w, STAGE_JOINED, pid);
    read_go(ctx.go[2])?;
    sessions::give_back_foreground(ctx.tree, ctx.pty_masters, node)?;
    match node.kind {
        // A helper's children go to their subreaper.
        NodeKind::Helper => crate::sys::proc::exit_now(0),
        NodeKind::Zombie(z) => crate::sys::proc::exit_like(ctx.tree.zombies[z].exit_status),
        NodeKind::Task(i) => {
            collect_children(ctx, node)?;
            let fd = ctx.status_w;
            // The pipes of the barriers are not the task's (in a shared
            // table they go when its builder fills it: other tasks may
            // still wait on them).
            if table.is_none() {
                for g in ctx.go {
                    crate::sys::fd::close(g);
                }
            }
            let (_, m) = memory.ok_or("a task without its memory")?;
            task_main(ctx, i, fd, m, (role, fs_role))
        }
    }
}

/// Whether task `child` is made sharing `node`'s filesystem information
/// (CLONE_FS): it did so with its dumped parent, which `node` is.
fn shares_fs(ctx: &NodeCtx, node: &Node, child: &Node) -> bool {
    let (NodeKind::Task(p), NodeKind::Task(c)) = (node.kind, child.kind) else {
        return false;
    };
    let (p, c) = (&ctx.tree.procs[p], &ctx.tree.procs[c]);
    c.pstree.shares_fs && c.pstree.ppid == p.pstree.pid
}

/// Whether task `child` is made sharing `node`'s descriptor table
/// (CLONE_FILES): it did so with its dumped parent, which `node` is.
fn shares_files(ctx: &NodeCtx, node: &Node, child: &Node) -> bool {
    let (NodeKind::Task(p), NodeKind::Task(c)) = (node.kind, child.kind) else {
        return false;
    };
    let (p, c) = (&ctx.tree.procs[p], &ctx.tree.procs[c]);
    c.pstree.shares_files && c.pstree.ppid == p.pstree.pid
}

/// How many tasks share node `idx`'s descriptor table (`shares` is
/// [`shares_files`]) or filesystem information ([`shares_fs`]) through
/// it: its children made sharing it, theirs, and so on.
fn sharers(ctx: &NodeCtx, idx: usize, shares: fn(&NodeCtx, &Node, &Node) -> bool) -> u32 {
    let node = &ctx.plan.nodes[idx];
    node.children
        .iter()
        .filter(|&&c| shares(ctx, node, &ctx.plan.nodes[c]))
        .map(|&c| 1 + sharers(ctx, c, shares))
        .sum()
}

/// Helpers made by this task are collected; zombies made by it must have
/// exited (they stay for the task's code to collect).
fn collect_children(ctx: &NodeCtx, node: &Node) -> Result<(), String> {
    for &c in &node.children {
        let child = &ctx.plan.nodes[c];
        let cpid = Pid::from_raw(child.pid_at(node.depth()));
        match child.kind {
            NodeKind::Helper => {
                let _ = nix::sys::wait::waitpid(cpid, None);
            }
            NodeKind::Zombie(_) => {
                nix::sys::wait::waitid(Id::Pid(cpid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
                    .map_err(|e| {
                        format!(
                            "waiting for zombie {}: {}",
                            child.pid,
                            std::io::Error::from(e)
                        )
                    })?;
            }
            NodeKind::Task(_) => {}
        }
    }
    Ok(())
}

/// The task with its dumped pid, prepared for and handed over to the
/// restorer. Never returns.
fn task_main(
    ctx: &NodeCtx,
    i: usize,
    status_w: RawFd,
    m: super::task::Memory,
    roles: (TableRole, FsRole),
) -> ! {
    let img = &ctx.tree.procs[i];
    STATUS_FD.store(status_w, Ordering::Relaxed);
    match super::task::prepare(ctx, i, status_w, m, roles) {
        Ok(never) => match never {},
        Err(msg) => report_error_and_exit(img.pid(), &msg),
    }
}
