//! Mount namespaces.
//!
//! Dump: the namespace's mounts from the mountinfo of its first task, in
//! an order where each comes after its parent. Each says how the restore
//! makes it again: a bind of the same filesystem where cryo's own
//! namespace has it mounted (`host_path`: a namespace that is a copy of
//! the host's needs no flag), a bind of an earlier mount of the namespace
//! (`bind`), a new filesystem (`fresh`: tmpfs with its files in
//! tmpfs-ID.img, proc, sysfs, devpts, mqueue, an overlay of directories
//! cryo's namespace has at the same paths), or a path the user names
//! (`--external mnt[MOUNTPOINT]:KEY`). Anything else is refused naming the
//! mount. Peer groups are kept: shared among the namespace's mounts, or
//! with a mount of cryo's namespace (`host_group_path`).
//!
//! Restore ([`build`]): cryo makes the namespace before any task, in a
//! thread of its own, so that the tree's files open inside it; the tasks
//! enter it (setns). A proc filesystem of a pid namespace that does not
//! exist yet, and what is mounted below it, is mounted by the namespace's
//! first task once it is in that pid namespace (`late`, [`late_mounts`]).

#![forbid(unsafe_code)]

pub mod build;
pub mod info;
pub mod tmpfs;

use std::collections::{HashMap, HashSet};
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;

use cryo_image::proto::mount_entry::How;
use cryo_image::proto::{BindOf, MntState, MountEntry};
use cryo_image::ImageFileInfo;

use info::Mount;

/// The most bytes of file contents kept of one tmpfs.
const TMPFS_LIMIT: u64 = 1 << 30;

/// What the dump of mount namespaces needs beyond the tasks.
pub struct DumpCtx<'a> {
    /// The image directory (tmpfs-ID.img files go there).
    pub dir: &'a Path,
    /// `--external mnt[MOUNTPOINT]:KEY`, as (mountpoint, key).
    pub externals: &'a [(String, String)],
    /// The tmpfs files written.
    pub written: Vec<ImageFileInfo>,
}

/// A mount, named for messages: "mount 66 (tmpfs none at /tmp/x)".
fn named(m: &Mount) -> String {
    format!(
        "mount {} ({} {} at {})",
        m.id, m.fstype, m.source, m.mountpoint
    )
}

/// The ids of the mounts of cryo's own namespace, read once.
pub fn own_mount_ids() -> &'static HashSet<u32> {
    static IDS: std::sync::OnceLock<HashSet<u32>> = std::sync::OnceLock::new();
    IDS.get_or_init(|| {
        info::read("self")
            .map(|ms| ms.iter().map(|m| m.id).collect())
            .unwrap_or_default()
    })
}

/// The mounts of the namespace of task `pid` (its first task), with how
/// each is made again.
pub fn dump(pid: i32, cx: &mut DumpCtx) -> Result<MntState, String> {
    let mounts = info::read(&pid.to_string()).map_err(|e| format!("reading its mountinfo: {e}"))?;
    let host = info::read("self").map_err(|e| format!("reading cryo's mountinfo: {e}"))?;
    let ordered = in_order(mounts)?;
    let groups: HashSet<u32> = ordered
        .iter()
        .map(|m| m.shared)
        .filter(|&g| g != 0)
        .collect();
    let mut out: Vec<MountEntry> = Vec::with_capacity(ordered.len());
    for (i, m) in ordered.iter().enumerate() {
        let earlier = &ordered[..i];
        let mut e = MountEntry {
            id: m.id,
            parent: m.parent,
            mountpoint: m.mountpoint.clone(),
            root: m.root.clone(),
            fstype: m.fstype.clone(),
            source: m.source.clone(),
            fs_options: m.fs_options.clone(),
            flags: m.flags(),
            shared: m.shared,
            master: m.master,
            unbindable: m.unbindable,
            ..Default::default()
        };
        let (how, below) =
            how(pid, m, earlier, &host, cx).map_err(|w| format!("{}: {w}", named(m)))?;
        e.how = Some(how);
        e.host_below = below;
        (e.host_group_path, e.host_master) =
            host_group(m, &groups, &host).map_err(|w| format!("{}: {w}", named(m)))?;
        let parent_late = out.iter().any(|p| p.id == m.parent && p.late);
        let from_late =
            matches!(&e.how, Some(How::Bind(b)) if out.iter().any(|p| p.id == b.mount && p.late));
        e.late = parent_late || from_late || needs_task(pid, m, &e)?;
        let parent_shared = out.iter().any(|p| p.id == m.parent && p.shared != 0);
        if e.late && (m.shared != 0 || m.master != 0 || m.unbindable || parent_shared) {
            return Err(format!(
                "{}: it is mounted by the namespace's first task at the restore (it belongs to a namespace that task makes), which keeps no propagation yet: it and its parent must be private",
                named(m)
            ));
        }
        if matches!(e.how, Some(How::Fresh(_))) && m.fstype == "tmpfs" {
            dump_tmpfs(pid, m, cx).map_err(|w| format!("{}: {w}", named(m)))?;
        }
        out.push(e);
    }
    Ok(MntState { mounts: out })
}

/// A file opened through a mount the namespace's first task makes at the
/// restore (a late proc) could not be opened before the tasks exist: it
/// is refused, naming it.
pub fn check_files(
    namespaces: &[cryo_image::proto::NamespaceEntry],
    files: &[cryo_image::proto::FileEntry],
) -> Result<(), String> {
    let late: HashSet<u32> = namespaces
        .iter()
        .flat_map(|e| e.mnt.iter().flat_map(|m| m.mounts.iter()))
        .filter(|m| m.late)
        .map(|m| m.id)
        .collect();
    match files.iter().find(|f| f.mnt_id != 0 && late.contains(&f.mnt_id)) {
        Some(f) => Err(format!(
            "file {} is open on mount {}, which the namespace's first task mounts at the restore (a proc of its pid namespace): not supported yet",
            f.path, f.mnt_id
        )),
        None => Ok(()),
    }
}

/// The mounts with each after its parent (breadth first from the one
/// root, in mountinfo's order among siblings).
fn in_order(mounts: Vec<Mount>) -> Result<Vec<Mount>, String> {
    let ids: HashSet<u32> = mounts.iter().map(|m| m.id).collect();
    let mut roots = mounts
        .iter()
        .filter(|m| !ids.contains(&m.parent) || m.parent == m.id);
    let root = roots
        .next()
        .ok_or("no root mount in its mountinfo")?
        .clone();
    if let Some(other) = roots.next() {
        return Err(format!(
            "two mounts without a parent in the namespace: {} and {}",
            named(&root),
            named(other)
        ));
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let id = out[i].id;
        out.extend(
            mounts
                .iter()
                .filter(|m| m.parent == id && m.id != id)
                .cloned(),
        );
        i += 1;
    }
    if out.len() != mounts.len() {
        return Err("its mountinfo has mounts that hang from no other".into());
    }
    Ok(out)
}

/// How mount `m` is made again, and (of a host path) how many mounts of
/// cryo's namespace hide the one meant.
fn how(
    pid: i32,
    m: &Mount,
    earlier: &[Mount],
    host: &[Mount],
    cx: &DumpCtx,
) -> Result<(How, u32), String> {
    if let Some((_, key)) = cx.externals.iter().find(|(mp, _)| *mp == m.mountpoint) {
        return Ok((How::External(key.clone()), 0));
    }
    // The same filesystem mounted before in the namespace: a bind of it.
    if let Some((e, sub)) = earlier
        .iter()
        .filter(|e| e.dev == m.dev)
        .find_map(|e| Some((e, info::below(&m.root, &e.root)?)))
    {
        return Ok((
            How::Bind(BindOf {
                mount: e.id,
                subdir: sub.to_string(),
            }),
            0,
        ));
    }
    // Mounted in cryo's namespace: a bind of it there, the deepest root
    // that holds this one's.
    let best = host
        .iter()
        .filter(|h| h.dev == m.dev)
        .filter_map(|h| Some((h, info::below(&m.root, &h.root)?)))
        .max_by_key(|(h, _)| h.root.len());
    if let Some((h, sub)) = best {
        let path = if sub.is_empty() {
            h.mountpoint.clone()
        } else {
            format!("{}/{sub}", h.mountpoint.trim_end_matches('/'))
        };
        return Ok((How::HostPath(path), hidden_by(h, host)));
    }
    match m.fstype.as_str() {
        "tmpfs" | "proc" | "sysfs" | "devpts" | "mqueue" => Ok((How::Fresh(true), 0)),
        // Its layers are directories cryo's namespace has at the same
        // paths: a new overlay of them shows the same files.
        "overlay" => overlay_layers(pid, &m.fs_options).map(|()| (How::Fresh(true), 0)),
        other => Err(format!(
            "its {other} filesystem is not mounted in cryo's namespace and cryo cannot make one again; name it at the dump with --external mnt[{}]:KEY and at the restore with --external mnt[KEY]:PATH",
            m.mountpoint
        )),
    }
}

/// An overlay's layers (lowerdir, upperdir, workdir) are the same
/// directories for task `pid` (through its root) and for cryo.
fn overlay_layers(pid: i32, options: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let mut dirs = Vec::new();
    for o in options.split(',') {
        match o.split_once('=') {
            Some(("lowerdir", v)) => dirs.extend(v.split(':').map(str::to_string)),
            Some(("upperdir" | "workdir", v)) => dirs.push(v.to_string()),
            _ => {}
        }
    }
    for d in &dirs {
        let theirs = id(&format!("/proc/{pid}/root{d}"));
        if theirs.is_none() || theirs != id(d) {
            return Err(format!(
                "its layer {d} is not the directory cryo's namespace has there; name the mount with --external"
            ));
        }
    }
    Ok(())
}

/// How many mounts of `all` are stacked on `h` at its mountpoint.
fn hidden_by(h: &Mount, all: &[Mount]) -> u32 {
    let mut n = 0;
    let mut top = h.id;
    while let Some(above) = all
        .iter()
        .find(|k| k.parent == top && k.mountpoint == h.mountpoint && k.id != top)
    {
        n += 1;
        top = above.id;
    }
    n
}

/// A peer group of `m` (shared or master) that mounts of cryo's
/// namespace are in too: the mountpoint of one of them, and whether it is
/// `m`'s master ("" if there is none to keep). A master that is neither
/// that nor a group of the namespace's own `groups` is refused.
fn host_group(m: &Mount, groups: &HashSet<u32>, host: &[Mount]) -> Result<(String, bool), String> {
    let of_host = |g: u32| host.iter().find(|h| g != 0 && h.shared == g);
    match (of_host(m.shared), of_host(m.master)) {
        (None, None) if m.master != 0 && !groups.contains(&m.master) => Err(format!(
            "its master peer group {} is neither in the namespace nor in cryo's: not supported yet",
            m.master
        )),
        (None, None) => Ok((String::new(), false)),
        (Some(h), None) => Ok((h.mountpoint.clone(), false)),
        (None, Some(h)) => Ok((h.mountpoint.clone(), true)),
        (Some(_), Some(_)) => Err(
            "it is shared with one peer group of cryo's namespace and a slave of another: not supported yet"
                .into(),
        ),
    }
}

/// Whether a new filesystem of `m` belongs to a namespace the restore
/// makes in a task (a proc of another pid namespace, an mqueue of another
/// IPC namespace), so that the namespace's first task `pid` mounts it.
fn needs_task(pid: i32, m: &Mount, e: &MountEntry) -> Result<bool, String> {
    if !matches!(e.how, Some(How::Fresh(_))) {
        return Ok(false);
    }
    match m.fstype.as_str() {
        "proc" => proc_is_tasks(pid, m),
        "mqueue" => Ok(!super::is_own(pid, super::NsKind::Ipc)),
        _ => Ok(false),
    }
}

/// Whether the proc at `m` is of another pid namespace than cryo's
/// (then it must be that of the mount namespace's first task `pid`):
/// cryo sees itself in its own namespace's proc only.
fn proc_is_tasks(pid: i32, m: &Mount) -> Result<bool, String> {
    let base = format!("/proc/{pid}/root{}", m.mountpoint.trim_end_matches('/'));
    match std::fs::read_link(format!("{base}/self")) {
        Ok(me) if me.to_str() == Some(std::process::id().to_string().as_str()) => Ok(false),
        Ok(_) => Err("a proc of a pid namespace above cryo's: not supported".into()),
        Err(_) => {
            // The first task's pid in its innermost namespace, seen there.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let status = crate::proc::parse_status(&status);
            let pids = super::ns_pids(pid, status.get("NSpid").map(String::as_str));
            let inner = pids.last().copied().unwrap_or(pid as u32);
            let theirs = std::fs::read_link(format!("{base}/{inner}/ns/pid")).ok();
            let task = super::link(&pid.to_string(), super::NsKind::Pid);
            if theirs.is_some() && theirs.map(|p| p.display().to_string()) == task {
                Ok(true)
            } else {
                Err(format!(
                    "a proc of a pid namespace that the mount namespace's first task {pid} is not in: not supported yet"
                ))
            }
        }
    }
}

/// The files of the tmpfs of `m`, through task `pid`'s root.
fn dump_tmpfs(pid: i32, m: &Mount, cx: &mut DumpCtx) -> Result<(), String> {
    use nix::fcntl::OFlag;
    let path = format!("/proc/{pid}/root{}", m.mountpoint);
    let fd = nix::fcntl::open(
        path.as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening {path}: {}", std::io::Error::from(e)))?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| format!("fstat {path}: {e}"))?;
    let dev = (libc::major(st.st_dev), libc::minor(st.st_dev));
    if dev != m.dev {
        return Err(
            "another mount hides it at its mountpoint: a hidden tmpfs is not supported yet".into(),
        );
    }
    let (info, _) = tmpfs::dump(&fd, cx.dir, m.id, TMPFS_LIMIT)?;
    cx.written.push(info);
    Ok(())
}

/// Where each mount of `state` is, below `top` (the new root's place
/// while the namespace is built; "" once inside it).
fn target(top: &str, m: &MountEntry) -> String {
    let mp = m.mountpoint.trim_end_matches('/');
    format!("{top}{mp}")
}

/// In the namespace's first task, once it is in the namespace and in the
/// namespaces it makes: the `late` mounts.
/// A tmpfs among them, or one made from a host path or an external
/// source, is the detached mount cryo made (`copies`, by mount id).
pub fn late_mounts(state: &MntState, copies: &HashMap<u32, RawFd>) -> Result<(), String> {
    for m in state.mounts.iter().filter(|m| m.late) {
        let made = match copies.get(&m.id) {
            Some(fd) => crate::sys::mount::attach(&crate::sys::fd::borrow(*fd), &target("", m))
                .map_err(|e| format!("attaching the mount cryo made for it: {e}")),
            None => build::make_one(state, m, "", None, Path::new("")),
        };
        made.map_err(|w| format!("mount {} at {}: {w}", m.id, m.mountpoint))?;
        build::set_flags(m, &target("", m))?;
    }
    Ok(())
}

/// What [`make_all`] made: each namespace by its inode at the dump, and
/// the detached mounts of late mounts by mount id.
pub type AllMade = (HashMap<u64, OwnedFd>, HashMap<u32, OwnedFd>);

/// In cryo, before any task: every mount namespace of the image made
/// ([`build::make`]), by its inode at the dump. `root` (--root): the
/// directory the first one's root mount binds instead of the dumped one.
/// Also returned: the detached mounts of late mounts (see
/// [`build::Made`]).
pub fn make_all(
    entries: &[cryo_image::proto::NamespaceEntry],
    dir: &Path,
    externals: &HashMap<String, String>,
    root: Option<&str>,
    owned: &HashMap<u64, OwnedFd>,
) -> Result<AllMade, String> {
    let mut late = HashMap::new();
    let out = super::make_each(entries, super::NsKind::Mnt, |i, e| {
        let mut state = e.mnt.clone().ok_or("namespaces.img has no mounts for it")?;
        if let (0, Some(r), Some(m)) = (i, root, state.mounts.first_mut()) {
            m.how = Some(How::HostPath(r.to_string()));
            m.host_below = 0;
        }
        let (ns, tmpfs) = build::make(&state, dir, externals, owned.get(&e.inode))?;
        late.extend(tmpfs);
        Ok(ns)
    })?;
    if let (true, Some(r)) = (out.is_empty(), root) {
        return Err(format!(
            "--root {r}: the tree has no mount namespace of its own (its tasks were in the dumping cryo's)"
        ));
    }
    Ok((out, late))
}

/// In a task: enter the mount namespace cryo made for `e`, then mount
/// what only a task of its namespaces can (see [`late_mounts`]).
pub fn enter(
    e: &cryo_image::proto::NamespaceEntry,
    made: &HashMap<u64, RawFd>,
    tmpfs: &HashMap<u32, RawFd>,
) -> Result<(), String> {
    super::enter_made(e, made, nix::sched::CloneFlags::CLONE_NEWNS)?;
    match &e.mnt {
        Some(state) => late_mounts(state, tmpfs),
        None => Ok(()),
    }
}

/// An `--external` value of the mount kind, `mnt[A]:B`, as (A, B): at the
/// dump a mountpoint and its key, at the restore a key and its path.
pub fn parse_external(s: &str) -> Result<(String, String), String> {
    let bad = || {
        format!("--external {s}: expected mnt[MOUNTPOINT]:KEY (dump) or mnt[KEY]:PATH (restore); only mounts can be external yet")
    };
    let rest = s.strip_prefix("mnt[").ok_or_else(bad)?;
    let (a, b) = rest.split_once("]:").ok_or_else(bad)?;
    if a.is_empty() || b.is_empty() {
        return Err(bad());
    }
    Ok((a.to_string(), b.to_string()))
}

/// Every `--external` value of the mount kind (see [`parse_external`]);
/// `unix[INODE]` ones are left to [`external_sockets`].
pub fn parse_externals(all: &[String]) -> Result<Vec<(String, String)>, String> {
    all.iter()
        .filter(|e| !e.starts_with("unix["))
        .map(|e| parse_external(e))
        .collect()
}

/// The inodes of the `--external unix[INODE]` values (dump side).
pub fn external_sockets(all: &[String]) -> Result<Vec<u64>, String> {
    all.iter()
        .filter_map(|e| e.strip_prefix("unix["))
        .map(|r| {
            r.strip_suffix(']')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("--external unix[{r}: expected unix[INODE]"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_values() {
        assert_eq!(
            parse_external("mnt[/data]:vol").unwrap(),
            ("/data".to_string(), "vol".to_string())
        );
        assert!(parse_external("veth[a]:b").is_err());
        assert!(parse_external("mnt[]:b").is_err());
        assert!(parse_external("mnt[/x]").is_err());
    }

    fn m(id: u32, parent: u32, mp: &str) -> Mount {
        info::parse_line(&format!("{id} {parent} 0:1 / {mp} rw - tmpfs t rw")).unwrap()
    }

    #[test]
    fn order_puts_parents_first_and_counts_stacks() {
        let ms = vec![
            m(5, 3, "/a/b"),
            m(3, 1, "/a"),
            m(1, 0, "/"),
            m(6, 5, "/a/b"),
        ];
        let o = in_order(ms.clone()).unwrap();
        let ids: Vec<u32> = o.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 3, 5, 6]);
        assert_eq!(hidden_by(&ms[0], &ms), 1);
        assert_eq!(hidden_by(&ms[3], &ms), 0);
        assert!(in_order(vec![m(1, 0, "/"), m(2, 9, "/x")]).is_err());
    }
}
