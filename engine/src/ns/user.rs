//! User namespaces whose parent is the dumping cryo's: their uid and gid
//! maps and setgroups, and the namespaces they own.
//!
//! Restore: a helper process of cryo's ([`crate::sys::ns::NsHelper`])
//! unshares the user namespace, cryo writes its maps, then the helper
//! unshares inside it each mount, network, UTS, IPC and time namespace of
//! the image the user namespace owns, so that each is owned by it again
//! (a time namespace with its offsets written before any task enters it),
//! and once the tree's cgroups exist, goes into a cgroup namespace's
//! roots and unshares that too; cryo opens them all, fills the UTS and
//! IPC ones and builds the mount and network ones. The tasks are created
//! with cryo's credentials (so that each gets its pid at every level),
//! enter the namespaces made for them, and each joins its user namespace
//! last, right before the restorer, which sets its ids as the namespace
//! sees them.
//!
//! A pid namespace the user namespace owns can only be made by a task of
//! that user namespace, which clone3 then refuses a chosen pid in the
//! host's pid namespace (set_tid asks for CAP_CHECKPOINT_RESTORE there):
//! the tree's root is created by an intermediate process that joins the
//! root's cgroups and the user namespace first (restore::spawn_in_userns),
//! every task of that pid namespace keeps its pid inside it, and its pid
//! in cryo's is the kernel's (the supervisor learns it from the fork
//! events; `--pidfile` gives the root's).
//!
//! Not kept yet, refused at the dump by name: a user namespace inside
//! another of the tree's; a first task of it that is not a root of the
//! tree (its parent outside); threads of a process in it but outside a
//! pid namespace it owns (their host tids could not be chosen); a process
//! in it sharing its filesystem information with its parent (CLONE_FS:
//! setns would refuse it); and in a pid namespace it owns, a task outside
//! it, in a pid namespace below, in a namespace another user namespace
//! owns, or in other cgroups than the root's (a task inside cannot move
//! itself).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};

use cryo_image::proto::{IdRange, NamespaceEntry, UserNsState};

use super::{NsError, NsKind, NsProc};

/// The kinds a tree's user namespace may own, as the helper unshares
/// them.
const OWNED: [(NsKind, libc::c_int); 5] = [
    (NsKind::Mnt, libc::CLONE_NEWNS),
    (NsKind::Net, libc::CLONE_NEWNET),
    (NsKind::Uts, libc::CLONE_NEWUTS),
    (NsKind::Ipc, libc::CLONE_NEWIPC),
    (NsKind::Time, libc::CLONE_NEWTIME),
];

fn parse_map(text: &str) -> Vec<IdRange> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some(IdRange {
                inside: f.next()??,
                outside: f.next()??,
                count: f.next()??,
            })
        })
        .collect()
}

fn map_text(m: &[IdRange]) -> String {
    m.iter()
        .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
        .collect()
}

/// The user namespace open at `ns`, read through its task `pid`.
pub fn dump(pid: i32, ns: &std::fs::File) -> Result<UserNsState, String> {
    use std::os::unix::fs::MetadataExt;
    let parent = crate::sys::ns::parent_inode(ns).map_err(|e| format!("its parent: {e}"))?;
    let own = std::fs::metadata("/proc/self/ns/user").map_err(|e| e.to_string())?;
    if parent != own.ino() {
        return Err(format!(
            "its parent is user:[{parent}], not cryo's: a user namespace inside another one is not kept yet"
        ));
    }
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{name}"))
            .map_err(|e| format!("reading /proc/{pid}/{name}: {e}"))
    };
    Ok(UserNsState {
        uid_map: parse_map(&read("uid_map")?),
        gid_map: parse_map(&read("gid_map")?),
        setgroups: read("setgroups")?.trim() == "allow",
    })
}

/// The tree's user namespaces, their members and what they own, as the
/// restore can make them (see the module).
pub fn check(procs: &[NsProc], out: &[NamespaceEntry]) -> Result<(), NsError> {
    let users: Vec<&NamespaceEntry> = out.iter().filter(|e| e.kind == "user").collect();
    let by_pid: HashMap<i32, &NsProc> = procs.iter().map(|p| (p.pid, p)).collect();
    let in_tree = |pid: i32| by_pid.contains_key(&pid);
    for u in users {
        let shape = |what: String| NsError::Shape {
            ns: "user".into(),
            inode: u.inode,
            what,
        };
        let top = u.pids.iter().map(|&p| p as i32).find(|&p| {
            by_pid
                .get(&p)
                .is_none_or(|x| !u.pids.contains(&(x.ppid as u32)))
        });
        let top = top.ok_or_else(|| shape("it has no first task".into()))?;
        if by_pid.get(&top).is_some_and(|p| in_tree(p.ppid)) {
            return Err(shape(format!(
                "its first task {top} has its parent in the tree: only a root of the tree (dumped without its parent) may be the first task of a user namespace yet"
            )));
        }
        for e in out.iter().filter(|e| e.owner == u.inode) {
            let kind = super::kind_of(&e.kind);
            if kind == Some(NsKind::Pid) {
                owned_pid_ns(procs, out, u, e, top).map_err(shape)?;
                continue;
            }
            // A cgroup one is made once the cgroups are (Made::cgroups).
            if kind != Some(NsKind::Cgroup) && !OWNED.iter().any(|(k, _)| Some(*k) == kind) {
                return Err(shape(format!(
                    "it owns {} namespace {}: a {} namespace owned by a user namespace of the tree is not kept yet",
                    e.kind, e.inode, e.kind
                )));
            }
        }
        for &p in &u.pids {
            let p = p as i32;
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let threads = status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .unwrap_or_default();
            // Threads of a process in a pid namespace the user namespace
            // owns get their tids there (the host's are the kernel's);
            // elsewhere their host tids could not be chosen from inside.
            let in_owned_pid_ns = out
                .iter()
                .any(|e| e.kind == "pid" && e.owner == u.inode && e.pids.contains(&(p as u32)));
            if threads.trim() != "1" && !in_owned_pid_ns {
                return Err(shape(format!(
                    "task {p} in it has {} threads: threads of a process in a user namespace are kept only in a pid namespace it owns (their pids in the host's pid namespace cannot be chosen from inside it)",
                    threads.trim()
                )));
            }
            let ppid = by_pid.get(&p).map_or(0, |x| x.ppid);
            if in_tree(ppid) && crate::sys::kcmp_fs(p, ppid).unwrap_or(false) {
                return Err(shape(format!(
                    "task {p} in it shares its filesystem information with its parent {ppid} (CLONE_FS), which setns(CLONE_NEWUSER) refuses"
                )));
            }
        }
    }
    Ok(())
}

/// A pid namespace `pid` the tree's user namespace `u` owns, whose first
/// task is `top`'s: the restore makes it from inside `u` (its tasks' pids
/// in cryo's namespace are then the kernel's), so every task in it must
/// be in `u`, in no pid namespace below, in no namespace `u` does not own
/// but cryo's, and in the root's cgroups (the tasks cannot move
/// themselves from inside).
fn owned_pid_ns(
    procs: &[NsProc],
    out: &[NamespaceEntry],
    u: &NamespaceEntry,
    pid: &NamespaceEntry,
    top: i32,
) -> Result<(), String> {
    if !pid.pids.contains(&(top as u32)) {
        return Err(format!(
            "it owns pid namespace {} that its first task {top} is not in: only the root's pid namespace may be owned by a user namespace yet",
            pid.inode
        ));
    }
    let cgroups = |p: i32| std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
    let depth = procs
        .iter()
        .find(|p| p.pid == top)
        .map_or(0, |p| p.ns_pids.len());
    for p in procs.iter().filter(|p| pid.pids.contains(&(p.pid as u32))) {
        let why = if !u.pids.contains(&(p.pid as u32)) {
            "it is not in the user namespace".to_string()
        } else if p.ns_pids.len() != depth {
            "it is in a pid namespace below".to_string()
        } else if let Some(i) = p.ids.iter().find(|i| {
            !i.host
                && i.kind != "user"
                && out
                    .iter()
                    .any(|e| e.kind == i.kind && e.inode == i.inode && e.owner != u.inode)
        }) {
            format!(
                "its {} namespace {} is owned by another user namespace",
                i.kind, i.inode
            )
        } else if cgroups(p.pid) != cgroups(top) {
            format!("its cgroups are not those of {top}")
        } else {
            continue;
        };
        return Err(format!(
            "task {} of pid namespace {} it owns: {why} (not supported yet)",
            p.pid, pid.inode
        ));
    }
    Ok(())
}

/// What the restore made for the tree's user namespaces, by their inodes
/// at the dump: each user namespace, and each namespace one owns.
#[derive(Default)]
pub struct Made {
    pub users: HashMap<u64, OwnedFd>,
    pub owned: HashMap<u64, OwnedFd>,
    /// The helper of each user namespace, kept until its cgroup
    /// namespaces are made.
    helpers: HashMap<u64, crate::sys::ns::NsHelper>,
}

impl Made {
    /// Every cgroup namespace a user namespace of the tree owns, made by
    /// its helper once the tree's cgroups are (`targets`): the helper goes
    /// into the namespace's roots, then unshares it. The helpers end.
    pub fn cgroups(
        &mut self,
        entries: &[NamespaceEntry],
        procs: &[crate::restore::image::Image],
        targets: &crate::cgroup::Targets,
    ) -> Result<(), String> {
        for e in entries.iter().filter(|e| e.kind == "cgroup") {
            let Some(h) = self.helpers.get_mut(&e.owner) else {
                continue;
            };
            let err = |w: String| format!("cgroup namespace {}: {w}", e.inode);
            let st = e
                .cgroup
                .as_ref()
                .ok_or_else(|| err("no roots in the image".into()))?;
            let first = e.pids.first().copied().unwrap_or(0);
            let own = procs
                .iter()
                .find(|p| p.pid() == first as i32)
                .and_then(|p| p.core.process.as_ref())
                .map(|p| p.cgroups.clone())
                .unwrap_or_default();
            if !targets.is_empty() {
                for r in &st.roots {
                    let dir = super::cgroup::root_dir(r, &own, targets).map_err(err)?;
                    std::fs::write(dir.join("cgroup.procs"), h.pid.to_string()).map_err(|w| {
                        err(format!("moving its helper into {}: {w}", dir.display()))
                    })?;
                }
            }
            h.unshare(libc::CLONE_NEWCGROUP)
                .map_err(|w| err(format!("unsharing it: {w}")))?;
            let fd = h
                .open("cgroup")
                .map_err(|w| err(format!("opening it: {w}")))?;
            self.owned.insert(e.inode, fd);
        }
        self.helpers.clear();
        Ok(())
    }
}

/// In cryo, before any task (and before the mount and network
/// namespaces, which it makes in those of `owned`): every user namespace
/// of the image with its maps, the namespaces it owns, and the names and
/// System V objects of its UTS and IPC ones.
pub fn make_all(entries: &[NamespaceEntry]) -> Result<Made, String> {
    let mut made = Made::default();
    for u in entries.iter().filter(|e| e.kind == "user") {
        let err = |w: String| format!("user namespace {}: {w}", u.inode);
        let st = u
            .user
            .as_ref()
            .ok_or_else(|| err("no maps in the image".into()))?;
        let mut h = crate::sys::ns::NsHelper::start()
            .map_err(|e| err(format!("a helper unsharing it: {e}")))?;
        let write = |name: &str, text: &str| {
            h.write_proc(name, text)
                .map_err(|e| err(format!("writing its {name} ({text:?}): {e}")))
        };
        if !st.setgroups {
            write("setgroups", "deny")?;
        }
        // A map never written (unshare without one) stays so.
        if !st.uid_map.is_empty() {
            write("uid_map", &map_text(&st.uid_map))?;
        }
        if !st.gid_map.is_empty() {
            write("gid_map", &map_text(&st.gid_map))?;
        }
        let user = h
            .open("user")
            .map_err(|e| err(format!("opening it: {e}")))?;
        // A pid namespace it owns is made by the root's creation (see
        // restore::spawn_roots), a cgroup one once the cgroups exist
        // (Made::cgroups).
        for e in entries
            .iter()
            .filter(|e| e.owner == u.inode && e.kind != "pid" && e.kind != "cgroup")
        {
            let Some(&(kind, flag)) = OWNED.iter().find(|(k, _)| k.name() == e.kind) else {
                return Err(err(format!(
                    "it owns {} namespace {}, which cannot be made",
                    e.kind, e.inode
                )));
            };
            h.unshare(flag).map_err(|w| {
                err(format!(
                    "unsharing its {} namespace {}: {w}",
                    e.kind, e.inode
                ))
            })?;
            if kind == NsKind::Time {
                // Before any task is in it, as the kernel asks.
                let (mono, boot) = super::time::offsets_now(e.time.as_ref()).map_err(&err)?;
                let text = crate::sys::ns::offsets_text(mono, boot);
                h.write_proc("timens_offsets", &text)
                    .map_err(|w| err(format!("writing its timens_offsets ({text:?}): {w}")))?;
            }
            let name = match kind {
                NsKind::Time => "time_for_children",
                k => k.name(),
            };
            let fd = h
                .open(name)
                .map_err(|w| err(format!("opening its {} namespace: {w}", e.kind)))?;
            // Its root's uid outside (none mapped: the host's root owns
            // its sysctls).
            let root = st
                .uid_map
                .iter()
                .any(|r| r.inside == 0)
                .then(|| outside(&st.uid_map, 0));
            fill(e, &fd, root).map_err(|w| format!("{} namespace {}: {w}", e.kind, e.inode))?;
            made.owned.insert(e.inode, fd);
        }
        made.users.insert(u.inode, user);
        made.helpers.insert(u.inode, h);
    }
    Ok(made)
}

/// The names of a UTS namespace, the objects of an IPC one, set by a
/// thread of cryo's inside it.
fn fill(e: &NamespaceEntry, fd: &OwnedFd, root: Option<u32>) -> Result<(), String> {
    use nix::sched::CloneFlags;
    let fd = fd.try_clone().map_err(|e| e.to_string())?;
    let run = |flag, f: &(dyn Fn() -> Result<(), String> + Sync)| {
        crate::sys::ns::in_namespace(fd, flag, || f().map_err(std::io::Error::other))
            .map_err(|e| e.to_string())
    };
    match super::kind_of(&e.kind) {
        Some(NsKind::Uts) => {
            let st = e.uts.as_ref().ok_or("its names are not in the image")?;
            run(CloneFlags::CLONE_NEWUTS, &|| {
                crate::sys::ns::set_uts_names(&st.hostname, &st.domainname)
                    .map_err(|e| format!("sethostname, setdomainname: {e}"))
            })
        }
        Some(NsKind::Ipc) => run(CloneFlags::CLONE_NEWIPC, &|| {
            super::ipc::fill(e.ipc.as_ref(), root)
        }),
        _ => Ok(()),
    }
}

/// In a task: a descriptor of its user namespace, if it is one of the
/// tree's (`users`: made by cryo, by inode at the dump), to [`join`]
/// once it needs none of cryo's powers.
pub fn open_for(
    ids: &[cryo_image::proto::NamespaceId],
    users: &HashMap<u64, i32>,
) -> Result<Option<i32>, String> {
    let Some(id) = ids.iter().find(|i| i.kind == "user" && !i.host) else {
        return Ok(None);
    };
    let fd = users
        .get(&id.inode)
        .ok_or_else(|| format!("user namespace {}: cryo did not make it", id.inode))?;
    let dup = nix::unistd::dup(crate::sys::fd::borrow(*fd)).map_err(|e| {
        format!(
            "user namespace {}: dup: {}",
            id.inode,
            std::io::Error::from(e)
        )
    })?;
    Ok(Some(dup.into_raw_fd()))
}

/// Join the user namespace open at `fd` (from [`open_for`]; closed).
pub fn join(fd: i32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: String| std::fs::metadata(p).map(|m| m.ino()).ok();
    if ino(format!("/proc/self/fd/{fd}")) == ino("/proc/self/ns/user".into()) {
        // Created inside it already (restore::spawn_in_userns).
        crate::sys::fd::close(fd);
        return Ok(());
    }
    let joined = nix::sched::setns(
        crate::sys::fd::borrow(fd),
        nix::sched::CloneFlags::CLONE_NEWUSER,
    );
    crate::sys::fd::close(fd);
    joined.map_err(|e| {
        format!(
            "joining its user namespace (setns): {}",
            std::io::Error::from(e)
        )
    })
}

/// `id` of namespace `map` as its parent sees it (65534 where it is not
/// mapped).
pub fn outside(map: &[IdRange], id: u32) -> u32 {
    map.iter()
        .find(|r| id >= r.inside && id - r.inside < r.count)
        .map_or(65534, |r| r.outside + (id - r.inside))
}

/// `id` of the parent namespace as namespace `map` sees it (65534, the
/// overflow id, where it is not mapped).
pub fn inside(map: &[IdRange], id: u32) -> u32 {
    map.iter()
        .find(|r| id >= r.outside && id - r.outside < r.count)
        .map_or(65534, |r| r.inside + (id - r.outside))
}

/// Credentials as the dumping cryo saw them, as user namespace `st`
/// sees them; without ids (none set again: the task keeps those it joins
/// with, the same) where one of them is not mapped in it.
pub fn creds_inside(c: &cryo_image::proto::Creds, st: &UserNsState) -> cryo_image::proto::Creds {
    let mut c = c.clone();
    let mapped = |m: &[IdRange], id: &u32| {
        m.iter()
            .any(|r| *id >= r.outside && *id - r.outside < r.count)
    };
    if !c.uid.iter().all(|u| mapped(&st.uid_map, u))
        || !c.gid.iter().all(|g| mapped(&st.gid_map, g))
    {
        c.uid.clear();
        c.gid.clear();
        return c;
    }
    for u in c.uid.iter_mut() {
        *u = inside(&st.uid_map, *u);
    }
    for g in c.gid.iter_mut().chain(c.groups.iter_mut()) {
        *g = inside(&st.gid_map, *g);
    }
    c
}

/// The state of the user namespace of a task with namespaces `ids`, if it
/// is one of the tree's.
pub fn state_of<'a>(
    ids: &[cryo_image::proto::NamespaceId],
    entries: &'a [NamespaceEntry],
) -> Option<&'a UserNsState> {
    let id = ids.iter().find(|i| i.kind == "user" && !i.host)?;
    entries
        .iter()
        .find(|e| e.kind == "user" && e.inode == id.inode)?
        .user
        .as_ref()
}

/// The raw descriptors of `m`.
pub fn raw(m: &HashMap<u64, OwnedFd>) -> HashMap<u64, i32> {
    m.iter().map(|(k, v)| (*k, v.as_raw_fd())).collect()
}
