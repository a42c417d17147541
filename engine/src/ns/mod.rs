//! Namespaces: one arm per kind in [`check`] and [`restore`], so that a
//! new kind does not compile until both sides handle it.
//!
//! Dump: every task's namespaces are recorded by the inode of each
//! /proc/PID/ns link, marked `host` when it is cryo's own; each other one
//! becomes a namespaces.img entry with its owner (NS_GET_USERNS), its
//! members and its kind's state ([`uts`]: the names, [`time`]: the clock
//! offsets, [`ipc`]: the System V objects and POSIX queues, [`mnt`]: the
//! mount tree, [`cgroup`]: its roots; a [`pid`] namespace has none beyond
//! its tasks' pids). A kind whose state is not kept yet is refused
//! when it is not cryo's. The tasks of one namespace must hang together:
//! one of them, the first the restore creates, has its parent outside it
//! (or is a root).
//!
//! Restore: a task whose namespace of a kind differs from its parent's
//! makes it (unshare, then the kind's state) before it makes its memory
//! and its children, which inherit it; a pid namespace is made by the
//! task creating it (clone3 CLONE_NEWPID).

#![forbid(unsafe_code)]

use cryo_image::proto::{NamespaceEntry, NamespaceId};

pub mod cgroup;
pub mod ipc;
pub mod mnt;
pub mod net;
pub mod pid;
pub mod time;
pub mod user;
pub mod uts;

/// The kinds of namespace, as /proc/PID/ns names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsKind {
    Cgroup,
    Ipc,
    Mnt,
    Net,
    Pid,
    Time,
    User,
    Uts,
}

pub const ALL: [NsKind; 8] = [
    NsKind::Cgroup,
    NsKind::Ipc,
    NsKind::Mnt,
    NsKind::Net,
    NsKind::Pid,
    NsKind::Time,
    NsKind::User,
    NsKind::Uts,
];

impl NsKind {
    pub fn name(self) -> &'static str {
        match self {
            NsKind::Cgroup => "cgroup",
            NsKind::Ipc => "ipc",
            NsKind::Mnt => "mnt",
            NsKind::Net => "net",
            NsKind::Pid => "pid",
            NsKind::Time => "time",
            NsKind::User => "user",
            NsKind::Uts => "uts",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("task {pid} is in its own {ns} namespace ({id}); dumping tasks in other {ns} namespaces is not supported yet")]
    Foreign {
        pid: i32,
        ns: &'static str,
        id: String,
    },
    #[error("{ns} namespace {inode}: {what}")]
    Shape {
        ns: String,
        inode: u64,
        what: String,
    },
    #[error("task {pid}: its {ns} namespace: {what}")]
    Read {
        pid: i32,
        ns: &'static str,
        what: String,
    },
}

/// Whether a namespace of this kind other than cryo's is dumped and
/// restored.
fn kept(kind: NsKind) -> bool {
    match kind {
        NsKind::Uts
        | NsKind::Pid
        | NsKind::Time
        | NsKind::Ipc
        | NsKind::Mnt
        | NsKind::Cgroup
        | NsKind::Net => true,
        NsKind::User => true,
    }
}

fn kind_of(name: &str) -> Option<NsKind> {
    ALL.into_iter().find(|k| k.name() == name)
}

/// cryo's own namespace of `kind` (its /proc/self/ns link), read once:
/// every task of every dump is compared with it.
fn own(kind: NsKind) -> Option<&'static str> {
    static OWN: std::sync::OnceLock<Vec<Option<String>>> = std::sync::OnceLock::new();
    let all = OWN.get_or_init(|| ALL.iter().map(|&k| link("self", k)).collect());
    let i = ALL.iter().position(|&k| k == kind)?;
    all.get(i)?.as_deref()
}

/// Whether task `pid` is in cryo's own namespace of `kind`.
pub fn is_own(pid: i32, kind: NsKind) -> bool {
    let theirs = link(&pid.to_string(), kind);
    theirs.is_none() || theirs.as_deref() == own(kind)
}

fn link(pid: &str, kind: NsKind) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{}", kind.name()))
        .ok()
        .map(|p| p.display().to_string())
}

/// The inode in a /proc/PID/ns link (`mnt:[4026531841]`).
fn inode(link: &str) -> Option<u64> {
    link.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// Dump side of every kind: refuse a namespace that is not cryo's own
/// and whose state is not kept yet. Checked in the order the kernel
/// lists them, mnt first (paths), then pid, net, uts, ipc, user, cgroup,
/// time.
pub fn check(pid: i32) -> Result<(), NsError> {
    let order = [
        NsKind::Mnt,
        NsKind::Pid,
        NsKind::Net,
        NsKind::Uts,
        NsKind::Ipc,
        NsKind::User,
        NsKind::Cgroup,
        NsKind::Time,
    ];
    for kind in order.into_iter().filter(|&k| !kept(k)) {
        let theirs = link(&pid.to_string(), kind);
        if theirs.is_some() && theirs.as_deref() != own(kind) {
            return Err(NsError::Foreign {
                pid,
                ns: kind.name(),
                id: theirs.unwrap_or_default(),
            });
        }
    }
    check_for_children(pid, NsKind::Pid)?;
    check_for_children(pid, NsKind::Time)
}

/// A task whose namespace of `kind` (pid, time) for its children is not
/// its own (it called unshare, or setns, and its next child would be in
/// another) is refused: the restore could not put its later children
/// there.
fn check_for_children(pid: i32, kind: NsKind) -> Result<(), NsError> {
    let link = |name: String| std::fs::read_link(format!("/proc/{pid}/ns/{name}")).ok();
    // Unreadable while the namespace unshare made has no task yet.
    let own = link(kind.name().to_string());
    let children = link(format!("{}_for_children", kind.name()));
    if own.is_some() && children != own {
        let flag = match kind {
            NsKind::Time => "CLONE_NEWTIME",
            _ => "CLONE_NEWPID",
        };
        return Err(NsError::Read {
            pid,
            ns: kind.name(),
            what: format!(
                "its children's {} namespace ({}) is not its own ({}): a task that made a {} namespace for its children (unshare({flag})) or entered one (setns) is not supported yet",
                kind.name(),
                children.map_or("a new one".into(), |p| p.display().to_string()),
                own.map(|p| p.display().to_string()).unwrap_or_default(),
                kind.name()
            ),
        });
    }
    Ok(())
}

/// The namespaces of `pid`, by the inodes of /proc/PID/ns/*, in
/// alphabetical order of kind; `host`: cryo's own.
pub fn ids(pid: i32) -> Vec<NamespaceId> {
    ALL.iter()
        .filter_map(|&kind| {
            let theirs = link(&pid.to_string(), kind)?;
            Some(NamespaceId {
                kind: kind.name().to_string(),
                inode: inode(&theirs)?,
                host: own(kind) == Some(theirs.as_str()),
            })
        })
        .collect()
}

/// `pid`'s pid in each pid namespace it is in, cryo's first, from the
/// `NSpid` value of its /proc/PID/status (just `pid` without one).
pub fn ns_pids(pid: i32, nspid: Option<&str>) -> Vec<u32> {
    let pids = nspid.map(crate::proc::status_numbers).unwrap_or_default();
    if pids.is_empty() {
        vec![pid as u32]
    } else {
        pids
    }
}

/// What the namespace checks know of a dumped process.
#[derive(Clone, Copy)]
pub struct NsProc<'a> {
    pub pid: i32,
    pub ppid: i32,
    pub ids: &'a [NamespaceId],
    /// Its pids from cryo's level inward.
    pub ns_pids: &'a [u32],
}

/// One namespaces.img entry per namespace of the tree that is not cryo's,
/// from each process's namespaces; the tree is stopped. A mount
/// namespace's tmpfs files go to `mnt.dir`.
pub fn collect(procs: &[NsProc], mnt: &mut mnt::DumpCtx) -> Result<Vec<NamespaceEntry>, NsError> {
    let mut out: Vec<NamespaceEntry> = Vec::new();
    let mut nets: Vec<(u64, i32)> = Vec::new();
    for &NsProc { pid, ids, .. } in procs {
        for id in ids
            .iter()
            .filter(|i| !i.host && i.kind == NsKind::Net.name())
        {
            if !nets.iter().any(|(i, _)| *i == id.inode) {
                nets.push((id.inode, pid));
            }
        }
    }
    for &NsProc { pid, ids, .. } in procs {
        for id in ids.iter().filter(|i| !i.host) {
            match out
                .iter_mut()
                .find(|e| e.kind == id.kind && e.inode == id.inode)
            {
                Some(e) => e.pids.push(pid as u32),
                None => out.push(entry(pid, id, mnt, &nets)?),
            }
        }
    }
    check_shape(procs, &out)?;
    user::check(procs, &out)?;
    Ok(out)
}

/// The entry of namespace `id`, read through its first process `pid`;
/// `nets`: each network namespace of the tree with its first process.
fn entry(
    pid: i32,
    id: &NamespaceId,
    cx: &mut mnt::DumpCtx,
    nets: &[(u64, i32)],
) -> Result<NamespaceEntry, NsError> {
    let kind = kind_of(&id.kind).ok_or_else(|| NsError::Shape {
        ns: id.kind.clone(),
        inode: id.inode,
        what: "a kind cryo does not know".into(),
    })?;
    let read = |what: String| NsError::Read {
        pid,
        ns: kind.name(),
        what,
    };
    let path = format!("/proc/{pid}/ns/{}", kind.name());
    let ns = std::fs::File::open(&path).map_err(|e| read(format!("opening {path}: {e}")))?;
    let owner = crate::sys::ns::owner_inode(&ns).unwrap_or(0);
    let mut e = NamespaceEntry {
        kind: id.kind.clone(),
        inode: id.inode,
        owner,
        pids: vec![pid as u32],
        ..Default::default()
    };
    match kind {
        NsKind::Uts => e.uts = Some(uts::dump(ns.into()).map_err(read)?),
        // Nothing beyond its tasks and their pids (the pstree's).
        NsKind::Pid => {}
        NsKind::Time => e.time = Some(time::dump(pid).map_err(read)?),
        NsKind::Ipc => e.ipc = Some(ipc::dump(ns.into()).map_err(read)?),
        NsKind::Mnt => e.mnt = Some(mnt::dump(pid, cx).map_err(read)?),
        NsKind::Cgroup => e.cgroup = Some(cgroup::dump(ns.into(), pid).map_err(read)?),
        NsKind::Net => {
            let open = |path: String| {
                std::fs::File::open(&path)
                    .map(std::os::fd::OwnedFd::from)
                    .map_err(|e| read(format!("opening {path}: {e}")))
            };
            let mut others = vec![(0, open("/proc/self/ns/net".into())?)];
            for &(inode, p) in nets.iter().filter(|(i, _)| *i != id.inode) {
                others.push((inode, open(format!("/proc/{p}/ns/net"))?));
            }
            e.net = Some(net::dump(ns.into(), id.inode, &others).map_err(read)?)
        }
        NsKind::User => e.user = Some(user::dump(pid, &ns).map_err(read)?),
    }
    Ok(e)
}

/// Each namespace has one process whose parent is not in it (the one
/// the restore makes it in; a pid namespace's must be its init), and a
/// process in cryo's namespace does not have a parent in another one (it
/// could not go back there).
fn check_shape(procs: &[NsProc], out: &[NamespaceEntry]) -> Result<(), NsError> {
    let by_pid: std::collections::HashMap<i32, &NsProc> =
        procs.iter().map(|p| (p.pid, p)).collect();
    let ns_of = |pid: i32, kind: &str| {
        by_pid
            .get(&pid)
            .and_then(|p| p.ids.iter().find(|i| i.kind == kind))
    };
    for e in out {
        let tops: Vec<u32> = e
            .pids
            .iter()
            .copied()
            .filter(|&p| {
                let ppid = by_pid.get(&(p as i32)).map_or(0, |x| x.ppid);
                ns_of(ppid, &e.kind).is_none_or(|i| i.inode != e.inode)
            })
            .collect();
        if tops.len() > 1 {
            return Err(NsError::Shape {
                ns: e.kind.clone(),
                inode: e.inode,
                what: format!(
                    "processes {tops:?} are in it but their parents are not: only one process of a namespace may have its parent outside it (the restore makes the namespace there)"
                ),
            });
        }
        if let (true, Some(top)) = (e.kind == NsKind::Pid.name(), tops.first()) {
            let p = by_pid.get(&(*top as i32));
            let parent_dumped = p.is_some_and(|p| by_pid.contains_key(&p.ppid));
            pid::check_top(
                e.inode,
                *top,
                p.map(|p| p.ns_pids).unwrap_or_default(),
                parent_dumped,
            )?;
        }
    }
    for &NsProc { pid, ppid, ids, .. } in procs {
        for id in ids.iter().filter(|i| i.host) {
            if ns_of(ppid, &id.kind).is_some_and(|p| !p.host) {
                return Err(NsError::Shape {
                    ns: id.kind.clone(),
                    inode: id.inode,
                    what: format!(
                        "task {pid} is in cryo's own {} namespace but its parent {ppid} is not",
                        id.kind
                    ),
                });
            }
        }
    }
    Ok(())
}

/// What the restore side of namespaces needs of the task beyond them.
pub struct RestoreCtx<'a> {
    /// The mount and network namespaces cryo made, by their inode at the
    /// dump.
    pub mnt_made: &'a std::collections::HashMap<u64, std::os::fd::RawFd>,
    /// The detached mounts cryo made for late mounts, by mount id.
    pub late_tmpfs: &'a std::collections::HashMap<u32, std::os::fd::RawFd>,
    pub net_made: &'a std::collections::HashMap<u64, std::os::fd::RawFd>,
    /// The UTS, IPC, time and cgroup namespaces cryo made, owned by one
    /// of the tree's user namespaces, by their inode at the dump.
    pub owned: &'a std::collections::HashMap<u64, std::os::fd::RawFd>,
    /// The task's cgroups, and where the restore put the tree's.
    pub cgroups: &'a [cryo_image::proto::CgroupEntry],
    pub cgroup_targets: &'a crate::cgroup::Targets,
}

/// Restore side of every kind, in the new task before it makes its
/// memory and its children: each namespace that is not its parent's
/// (`parent`: None for a root, which cryo made in its own) is made here,
/// with its state from `entries`; a mount or network namespace, which
/// cryo made before the tasks, is entered.
pub fn restore(
    ids: &[NamespaceId],
    parent: Option<&[NamespaceId]>,
    entries: &[NamespaceEntry],
    cx: &RestoreCtx,
) -> Result<(), String> {
    for id in ids.iter().filter(|i| !i.host) {
        let inherited = parent
            .and_then(|p| p.iter().find(|i| i.kind == id.kind))
            .is_some_and(|p| p.inode == id.inode);
        if inherited {
            continue;
        }
        let Some(kind) = kind_of(&id.kind) else {
            return Err(format!("a namespace of unknown kind {:?}", id.kind));
        };
        let e = entries
            .iter()
            .find(|e| e.kind == id.kind && e.inode == id.inode)
            .ok_or_else(|| format!("{} namespace {}: not in namespaces.img", id.kind, id.inode))?;
        let made = match kind {
            NsKind::Uts | NsKind::Ipc | NsKind::Time if cx.owned.contains_key(&e.inode) => {
                let flag = match kind {
                    NsKind::Uts => libc::CLONE_NEWUTS,
                    NsKind::Ipc => libc::CLONE_NEWIPC,
                    _ => libc::CLONE_NEWTIME,
                };
                enter_made(e, cx.owned, nix::sched::CloneFlags::from_bits_retain(flag))
            }
            NsKind::Cgroup if cx.owned.contains_key(&e.inode) => {
                cgroup::enter(cx.owned[&e.inode], cx.cgroups, cx.cgroup_targets)
            }
            // Joined last, right before the restorer (user::join).
            NsKind::User => Ok(()),
            NsKind::Uts => uts::restore(e.uts.as_ref()),
            // Made by the task creating this one (clone3 CLONE_NEWPID).
            NsKind::Pid => Ok(()),
            NsKind::Time => time::restore(e.time.as_ref()),
            NsKind::Ipc => ipc::restore(e.ipc.as_ref()),
            NsKind::Mnt => mnt::enter(e, cx.mnt_made, cx.late_tmpfs),
            NsKind::Cgroup => cgroup::restore(e.cgroup.as_ref(), cx.cgroups, cx.cgroup_targets),
            NsKind::Net => enter_made(e, cx.net_made, nix::sched::CloneFlags::CLONE_NEWNET),
        };
        made.map_err(|m| format!("making its {} namespace {}: {m}", id.kind, id.inode))?;
    }
    Ok(())
}

/// In cryo, before any task: each namespace of `kind` of the image made
/// by `make` (given its index among them), by its inode at the dump.
pub fn make_each(
    entries: &[NamespaceEntry],
    kind: NsKind,
    mut make: impl FnMut(usize, &NamespaceEntry) -> Result<std::os::fd::OwnedFd, String>,
) -> Result<std::collections::HashMap<u64, std::os::fd::OwnedFd>, String> {
    let of_kind = entries.iter().filter(|e| e.kind == kind.name());
    of_kind
        .enumerate()
        .map(|(i, e)| {
            let fd = make(i, e).map_err(|w| format!("{} namespace {}: {w}", e.kind, e.inode))?;
            Ok((e.inode, fd))
        })
        .collect()
}

/// Enter the namespace cryo made for `e` (`made`, by inode).
pub(crate) fn enter_made(
    e: &NamespaceEntry,
    made: &std::collections::HashMap<u64, std::os::fd::RawFd>,
    kind: nix::sched::CloneFlags,
) -> Result<(), String> {
    let fd = made.get(&e.inode).ok_or("cryo did not make it")?;
    nix::sched::setns(crate::sys::fd::borrow(*fd), kind)
        .map_err(|err| format!("entering it (setns): {}", std::io::Error::from(err)))
}

/// Which mount and network namespace each open file of the tree is
/// opened in, for a thread of cryo's with its own filesystem information
/// (unshare CLONE_FS) that goes from one to the other (None: cryo's).
pub struct Switch {
    own: [std::os::fd::OwnedFd; 2],
    current: [Option<std::os::fd::RawFd>; 2],
    by_file: std::collections::HashMap<u32, [Option<std::os::fd::RawFd>; 2]>,
}

impl Switch {
    const KINDS: [nix::sched::CloneFlags; 2] = [
        nix::sched::CloneFlags::CLONE_NEWNS,
        nix::sched::CloneFlags::CLONE_NEWNET,
    ];

    /// Call in the thread, after unshare(CLONE_FS); `by_file`: each file's
    /// (mount, network) namespaces.
    pub fn new(
        by_file: std::collections::HashMap<u32, [Option<std::os::fd::RawFd>; 2]>,
    ) -> Result<Switch, String> {
        let open = |name: &str| {
            std::fs::File::open(format!("/proc/thread-self/ns/{name}"))
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| format!("opening cryo's {name} namespace: {e}"))
        };
        Ok(Switch {
            own: [open("mnt")?, open("net")?],
            current: [None, None],
            by_file,
        })
    }

    /// Whether the thread is in cryo's own mount namespace now.
    pub fn in_own_mnt(&self) -> bool {
        self.current[0].is_none()
    }

    /// Be in the namespaces of file `id`.
    pub fn enter_for(&mut self, id: u32) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let want = self.by_file.get(&id).copied().unwrap_or_default();
        for (k, w) in want.into_iter().enumerate() {
            if w == self.current[k] {
                continue;
            }
            let fd = w.unwrap_or(self.own[k].as_raw_fd());
            nix::sched::setns(crate::sys::fd::borrow(fd), Self::KINDS[k])
                .map_err(|e| format!("entering its namespace: {}", std::io::Error::from(e)))?;
            self.current[k] = w;
        }
        Ok(())
    }
}
