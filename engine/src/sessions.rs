//! Sessions, process groups and controlling terminals.
//!
//! Dump: every process must lead its session, share its parent's, or be
//! in one whose leader has exited (a helper task stands in for it at
//! restore); likewise for groups within a session ([`check`]). A session
//! whose controlling terminal is a pty of the tree records that pty and
//! its foreground group ([`pty_cttys`]). Restore (in the new tasks, see
//! `restore::node`): the leader takes its pty with TIOCSCTTY before it
//! makes its members, gives the foreground back to the dumped group once
//! every group exists; a member that had given the terminal up does so
//! again; a --shell-job in the foreground of its shell is made the
//! foreground of the restoring terminal ([`foreground_shell_jobs`]). The
//! plan of who calls setsid and who joins which group is
//! `restore::tree`.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::proc::Stat;
use crate::pstree::{self, Tree};
use crate::restore::image::TreeImage;
use crate::restore::tree::{Node, NodeKind, Plan};
use crate::sys;

#[derive(Debug, thiserror::Error)]
#[error("task {pid} {what}; such a session layout cannot be restored yet")]
pub struct SessionError {
    pub pid: i32,
    pub what: String,
}

/// Refuse session and process-group layouts the restore cannot rebuild,
/// naming the task.
pub fn check(tree: &Tree) -> Result<(), SessionError> {
    let pids = tree.pids();
    let info: BTreeMap<i32, (u32, u32, u32)> = tree
        .procs
        .iter()
        .map(|p| p.pid)
        .filter_map(|pid| pstree::stat(pid).map(|s| (pid, (s.ppid, s.pgid, s.sid))))
        .chain(
            tree.zombies
                .iter()
                .map(|z| (z.pid, (z.stat.ppid, z.stat.pgid, z.stat.sid))),
        )
        .collect();
    let dead = |id: u32| !pids.contains(&(id as i32)) && pstree::stat(id as i32).is_none();
    for (&pid, &(ppid, pgid, sid)) in &info {
        let Some(&(_, ppgid, psid)) = info.get(&(ppid as i32)) else {
            continue; // a root: it joins the restorer's session
        };
        let sid_ok = sid == pid as u32 || sid == psid || dead(sid);
        if !sid_ok {
            return Err(SessionError {
                pid,
                what: format!(
                    "is in session {sid}, which is neither its own, its parent's ({psid}) nor one whose leader has exited"
                ),
            });
        }
        let group_ok = pgid == pid as u32
            || pgid == ppgid
            || dead(pgid)
            || info
                .get(&(pgid as i32))
                .is_some_and(|&(_, _, gsid)| gsid == sid);
        if !group_ok {
            return Err(SessionError {
                pid,
                what: format!("is in process group {pgid}, which is not in its session"),
            });
        }
    }
    Ok(())
}

/// For every process whose controlling terminal is a pty of the tree
/// (`masters`: their indices), the pty's index and the terminal's
/// foreground group (0 when that is not a group of the tree's session any
/// more). A session's terminal goes back to its leader at restore and
/// from it to the members it creates; a member that gave it up gives it
/// up again.
pub fn pty_cttys(
    tree: &Tree,
    stats: &BTreeMap<i32, Stat>,
    masters: &BTreeSet<u32>,
) -> Result<BTreeMap<i32, (u32, u32)>, SessionError> {
    let mut out = BTreeMap::new();
    if masters.is_empty() {
        return Ok(out);
    }
    let groups: BTreeSet<(u32, u32)> = stats
        .values()
        .map(|s| (s.pgid, s.sid))
        .chain(tree.zombies.iter().map(|z| (z.stat.pgid, z.stat.sid)))
        .collect();
    for (&pid, s) in stats {
        let ctty = s.ctty();
        let Some(index) =
            sys::tty::pty_slave_index(ctty).filter(|i| ctty != 0 && masters.contains(i))
        else {
            continue;
        };
        if !stats.contains_key(&(s.sid as i32)) {
            return Err(SessionError {
                pid,
                what: format!(
                    "has pty {index} of the dumped tree as its controlling terminal, but its session leader {} is not in the tree",
                    s.sid
                ),
            });
        }
        if let Some(ps) = stats.get(&(s.ppid as i32)) {
            if ps.sid == s.sid && ps.ctty() != ctty && s.sid != pid as u32 {
                return Err(SessionError {
                    pid,
                    what: format!(
                        "keeps pty {index} as its controlling terminal, which its parent {} (in the same session) gave up",
                        s.ppid
                    ),
                });
            }
        }
        let pgrp = if s.tpgid > 0 && groups.contains(&(s.tpgid as u32, s.sid)) {
            s.tpgid as u32
        } else {
            0
        };
        out.insert(pid, (index, pgrp));
    }
    Ok(out)
}

// ---- restore ----

/// The pty that was the controlling terminal of a task node (its index)
/// and the master of it this task inherited (`pty_masters`, by index).
pub fn pty_ctty(
    tree: &TreeImage,
    pty_masters: &HashMap<u32, RawFd>,
    node: &Node,
) -> Result<Option<(u32, RawFd)>, String> {
    let NodeKind::Task(i) = node.kind else {
        return Ok(None);
    };
    let Some(index) = tree.procs[i].pstree.pty_ctty else {
        return Ok(None);
    };
    match pty_masters.get(&index) {
        Some(&m) => Ok(Some((index, m))),
        None => Err(format!(
            "its controlling terminal was pty {index}, whose master no process holds"
        )),
    }
}

/// In a new task: its session or group (a session leader takes its pty
/// as its controlling terminal before it creates the members of its
/// session, which inherit it); a member that had given up the session's
/// terminal gives it up again.
pub fn enter(
    tree: &TreeImage,
    pty_masters: &HashMap<u32, RawFd>,
    node: &Node,
) -> Result<(), String> {
    let os = |what: &'static str| move |e: Errno| format!("{what}: {}", std::io::Error::from(e));
    if node.setsid {
        nix::unistd::setsid().map_err(os("setsid"))?;
        if let Some((index, master)) = pty_ctty(tree, pty_masters, node)? {
            sys::tty::set_controlling(master).map_err(|e| {
                format!("making pty {index} its controlling terminal (TIOCSCTTY): {e}")
            })?;
        }
        return Ok(());
    }
    if node.group_leader {
        let me = nix::unistd::Pid::from_raw(0);
        nix::unistd::setpgid(me, me).map_err(os("setpgid (leading its group)"))?;
    }
    give_up_ctty(tree, node)
}

/// Second phase, once every group leader exists: join the dumped group.
pub fn join_group(pgid: i32) -> Result<(), String> {
    if pgid == 0 {
        return Ok(());
    }
    let me = nix::unistd::Pid::from_raw(0);
    let cur = nix::unistd::getpgid(None).map(|p| p.as_raw()).unwrap_or(-1);
    if cur != pgid {
        nix::unistd::setpgid(me, nix::unistd::Pid::from_raw(pgid))
            .map_err(|e| format!("joining process group {pgid}: {}", std::io::Error::from(e)))?;
    }
    Ok(())
}

/// Last phase, every group exists: a session leader gives its terminal's
/// foreground back to the group that had it.
pub fn give_back_foreground(
    tree: &TreeImage,
    pty_masters: &HashMap<u32, RawFd>,
    node: &Node,
) -> Result<(), String> {
    let (true, NodeKind::Task(i)) = (node.setsid, node.kind) else {
        return Ok(());
    };
    let Some((index, master)) = pty_ctty(tree, pty_masters, node)? else {
        return Ok(());
    };
    let g = tree.procs[i].pstree.tty_pgrp;
    let pgrp = tree
        .pids
        .seen_at(g, node.depth())
        .map_err(|e| format!("its terminal's foreground group {g}: {e}"))? as i32;
    if pgrp > 0 {
        sys::tty::set_foreground(master, pgrp).map_err(|e| {
            format!("making group {pgrp} the foreground of pty {index} (TIOCSPGRP): {e}")
        })?;
    }
    Ok(())
}

/// A member of a session whose terminal is a pty of the tree that had
/// given it up (TIOCNOTTY) at the dump, but inherited it from the task
/// that made it, gives it up again. Before it creates its own children.
fn give_up_ctty(tree: &TreeImage, node: &Node) -> Result<(), String> {
    let NodeKind::Task(i) = node.kind else {
        return Ok(());
    };
    let me = &tree.procs[i].pstree;
    let session_has_pty = tree
        .procs
        .iter()
        .any(|p| p.pstree.pid == me.sid && p.pstree.pty_ctty.is_some());
    if me.pty_ctty.is_some() || !session_has_pty {
        return Ok(());
    }
    let fd = match nix::fcntl::open(
        "/dev/tty",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => fd,
        // No controlling terminal: nothing to give up.
        Err(Errno::ENXIO) => return Ok(()),
        Err(e) => {
            return Err(format!(
                "opening its controlling terminal to give it up: {e}"
            ))
        }
    };
    sys::tty::drop_controlling(fd.as_raw_fd())
        .map_err(|e| format!("giving up its controlling terminal (TIOCNOTTY): {e}"))
}

/// A shell job that was in the foreground of its terminal is made the
/// foreground group of the restoring session's terminal again (with
/// SIGTTOU blocked: cryo may be in a background group).
pub fn foreground_shell_jobs(tree: &TreeImage, plan: &Plan) {
    for r in plan.roots() {
        let n = &plan.nodes[r];
        let NodeKind::Task(i) = n.kind else { continue };
        if !tree.procs[i].pstree.tty_foreground || !(n.group_leader || n.setsid) {
            continue;
        }
        let Ok(tty) = nix::fcntl::open(
            "/dev/tty",
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) else {
            continue;
        };
        let mut ttou = SigSet::empty();
        ttou.add(Signal::SIGTTOU);
        let mut old = SigSet::empty();
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old));
        if let Err(e) = nix::unistd::tcsetpgrp(tty.as_fd(), nix::unistd::Pid::from_raw(n.pid)) {
            tracing::warn!(
                pid = n.pid,
                "could not make the shell job the terminal's foreground group: {}",
                std::io::Error::from(e)
            );
        }
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
}
