//! Restore side of a mount namespace: made by a thread of cryo's before
//! any task exists (see the module above for the order of things).
//!
//! The thread takes a private copy of cryo's mount namespace, takes from
//! it the mounts the image binds (`host_path`, external paths; a mount
//! other mounts hid at the dump is reached by unmounting those in the
//! copy), mounts a tmpfs yard and builds the tree in it, each mount after
//! its parent, sets their propagation (peer groups of the namespace are
//! made with MOVE_MOUNT_SET_GROUP, a peer group of cryo's namespace is
//! joined through a copy of a mount of it that cryo's main thread, still
//! in that namespace, took), then makes the tree's root the namespace's
//! root (pivot_root: the root stays private until then) and lets the
//! rest of the copy go. The mounts' flags (read-only, ...) come last.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use cryo_image::proto::mount_entry::How;
use cryo_image::proto::{MntState, MountEntry};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::target;
use crate::sys::mount as sysm;

fn io(what: String) -> impl FnOnce(nix::errno::Errno) -> String {
    move |e| format!("{what}: {}", std::io::Error::from(e))
}

/// What [`make`] made: the namespace, held open, and a detached mount for
/// each late mount made from a copy (by mount id): a tmpfs filled from
/// the image, or the copy of a host path or external source, which the
/// namespace's first task attaches (it can neither read the image nor
/// reach cryo's mounts there).
pub type Made = (OwnedFd, Vec<(u32, OwnedFd)>);

/// Make the mount namespace of `state` (`dir`: the image, for the tmpfs
/// files; `externals`: the paths the user gave for --external keys).
pub fn make(
    state: &MntState,
    dir: &Path,
    externals: &HashMap<String, String>,
    premade: Option<&OwnedFd>,
) -> Result<Made, String> {
    check(state)?;
    // Copies of the mounts whose peer groups are kept, taken here, in
    // cryo's namespace: a copy is a member of its mount's peer group.
    let mut groups: HashMap<usize, OwnedFd> = HashMap::new();
    for (i, m) in state.mounts.iter().enumerate() {
        if !m.host_group_path.is_empty() {
            let fd = sysm::clone_mount(&m.host_group_path).map_err(|e| {
                format!(
                    "mount {} at {}: taking a copy of {} for its peer group: {e}",
                    m.id, m.mountpoint, m.host_group_path
                )
            })?;
            groups.insert(i, fd);
        }
    }
    let yard = std::env::temp_dir().join(format!(
        "cryo-mnt-{}-{}",
        std::process::id(),
        state.mounts.first().map_or(0, |m| m.id)
    ));
    std::fs::create_dir(&yard).map_err(|e| format!("making {}: {e}", yard.display()))?;
    let yard_s = yard.display().to_string();
    let made = std::thread::scope(|s| {
        s.spawn(|| in_thread(state, dir, externals, &yard_s, groups, premade))
            .join()
            .unwrap_or_else(|_| Err("the thread making it panicked".into()))
    });
    let _ = std::fs::remove_dir(&yard);
    made
}

/// The image's mounts make a tree: the first is the root ("/"), each
/// other comes after its parent, at an absolute path without "..", and
/// binds a directory below the mount it names.
fn check(state: &MntState) -> Result<(), String> {
    let dots = |p: &str| p.split('/').any(|c| c == "..");
    let ms = &state.mounts;
    if ms.first().map(|r| r.mountpoint.as_str()) != Some("/") {
        return Err("namespaces.img: its first mount is not its root, /".into());
    }
    for (i, m) in ms.iter().enumerate().skip(1) {
        let bad = if !m.mountpoint.starts_with('/') || dots(&m.mountpoint) {
            Some("a mountpoint that is not a plain absolute path")
        } else if !ms[..i].iter().any(|p| p.id == m.parent) {
            Some("no parent before it")
        } else if matches!(&m.how, Some(How::Bind(b)) if dots(&b.subdir) || !ms[..i].iter().any(|p| p.id == b.mount))
        {
            Some("a bind of no mount before it, or of a path out of one")
        } else {
            None
        };
        if let Some(what) = bad {
            return Err(format!(
                "namespaces.img: mount {} at {:?}: {what}",
                m.id, m.mountpoint
            ));
        }
    }
    Ok(())
}

/// The thread's part: everything but the peer group copies.
fn in_thread(
    state: &MntState,
    dir: &Path,
    externals: &HashMap<String, String>,
    yard: &str,
    groups: HashMap<usize, OwnedFd>,
    premade: Option<&OwnedFd>,
) -> Result<Made, String> {
    crate::sys::ns::private_mounts(None)
        .map_err(|e| format!("a private copy of cryo's mount namespace: {e}"))?;
    let mut sources = host_sources(state, externals)?;
    // A namespace a user namespace of the tree owns was made by the
    // helper that made that one (a copy of cryo's too, whose mounts the
    // kernel locks together: the sources are taken from cryo's first).
    if let Some(ns) = premade {
        crate::sys::ns::private_mounts(Some(ns))
            .map_err(|e| format!("entering the namespace made for it: {e}"))?;
    }
    // The namespace is this one from here on, whatever its root.
    let ns = std::fs::File::open("/proc/thread-self/ns/mnt")
        .map(OwnedFd::from)
        .map_err(|e| format!("opening the namespace it made: {e}"))?;
    mount(
        Some("cryo"),
        yard,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(io(format!("mounting a tmpfs on {yard}")))?;
    let top = format!("{yard}/root");
    std::fs::create_dir(&top).map_err(|e| format!("making {top}: {e}"))?;
    let mut late = late_tmpfs(state, yard, dir)?;
    for (i, m) in state.mounts.iter().enumerate().filter(|(_, m)| !m.late) {
        tracing::debug!(id = m.id, mp = %m.mountpoint, "mount");
        make_one(state, m, &top, sources.remove(&i), dir)
            .map_err(|w| format!("mount {} at {}: {w}", m.id, m.mountpoint))?;
    }
    // What is left are the sources of late mounts.
    late.extend(sources.into_iter().map(|(i, fd)| (state.mounts[i].id, fd)));
    let mut groups = groups;
    tracing::debug!("propagation");
    propagation(state, &top, yard, &mut groups)?;
    tracing::debug!("pivot");
    pivot(state, &top)?;
    tracing::debug!("flags");
    for m in state.mounts.iter().rev().filter(|m| !m.late) {
        set_flags(m, &target("", m))?;
    }
    Ok((ns, late))
}

/// Each late tmpfs (under a late proc, say: runc masks /proc/acpi with
/// one), made and filled here, in the yard, and taken as a detached copy.
fn late_tmpfs(state: &MntState, yard: &str, dir: &Path) -> Result<Vec<(u32, OwnedFd)>, String> {
    let mut out = Vec::new();
    for m in state
        .mounts
        .iter()
        .filter(|m| m.late && m.fstype == "tmpfs")
    {
        if !matches!(m.how, Some(How::Fresh(_))) {
            continue;
        }
        let scratch = format!("{yard}/late-{}", m.id);
        let fail = |w: String| format!("mount {} at {}: {w}", m.id, m.mountpoint);
        std::fs::create_dir(&scratch).map_err(|e| fail(format!("making {scratch}: {e}")))?;
        fresh(m, &scratch, dir).map_err(fail)?;
        let copy = sysm::clone_mount(&scratch)
            .map_err(|e| fail(format!("taking a detached copy of it: {e}")))?;
        umount2(scratch.as_str(), MntFlags::MNT_DETACH)
            .map_err(|e| fail(format!("unmounting {scratch}: {e}")))?;
        out.push((m.id, copy));
    }
    Ok(out)
}

/// Make the tree at `top` the namespace's root and let the rest go: the
/// old root is put on the root itself (pivot_root(".", ".")), or, when
/// the root is shared (which pivot_root refuses there), on a private
/// directory mount just below it; then unmounted.
fn pivot(state: &MntState, top: &str) -> Result<(), String> {
    let ms = &state.mounts;
    let put_old = match ms.first() {
        // Shared: a peer of a group (the namespace's or cryo's); a slave
        // only is not.
        Some(r) if r.shared != 0 => ms
            .iter()
            .filter(|m| m.parent == r.id && !m.late && m.shared == 0)
            .map(|m| target("", m))
            .find(|t| std::path::Path::new(&format!("{top}{t}")).is_dir())
            .ok_or(
                "its root is shared and no private directory mount is below it: not supported yet",
            )?,
        _ => ".".to_string(),
    };
    nix::unistd::chdir(top).map_err(io(format!("chdir {top}")))?;
    let rel = put_old.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    nix::unistd::pivot_root(".", rel).map_err(io("pivot_root".into()))?;
    let old = if rel == "." {
        "/".to_string()
    } else {
        format!("/{rel}")
    };
    umount2(old.as_str(), MntFlags::MNT_DETACH)
        .map_err(io("letting the copy of cryo's mounts go".into()))?;
    nix::unistd::chdir("/").map_err(io("chdir /".into()))
}

/// Copies of the mounts of cryo's namespace that mounts of the image bind
/// (by index), taken in the thread's private copy: for each path, the
/// visible one first, then each one below it after unmounting what was
/// stacked on it (in the copy only).
fn host_sources(
    state: &MntState,
    externals: &HashMap<String, String>,
) -> Result<HashMap<usize, OwnedFd>, String> {
    let mut wanted: Vec<(String, u32, usize)> = Vec::new();
    for (i, m) in state.mounts.iter().enumerate() {
        match &m.how {
            Some(How::HostPath(p)) => wanted.push((p.clone(), m.host_below, i)),
            Some(How::External(key)) => {
                let p = externals.get(key).ok_or_else(|| {
                    format!(
                        "mount {} at {} was named external with key {key}: give --external mnt[{key}]:PATH",
                        m.id, m.mountpoint
                    )
                })?;
                wanted.push((p.clone(), 0, i));
            }
            _ => {}
        }
    }
    wanted.sort();
    let mut out = HashMap::new();
    let mut gone: HashMap<String, u32> = HashMap::new();
    for (path, below, i) in wanted {
        let done = gone.entry(path.clone()).or_insert(0);
        while *done < below {
            umount2(path.as_str(), MntFlags::MNT_DETACH)
                .map_err(io(format!("reaching the mount hidden at {path}")))?;
            *done += 1;
        }
        let fd = sysm::clone_mount(&path).map_err(|e| {
            let m = &state.mounts[i];
            format!("mount {} at {}: taking {path}: {e}", m.id, m.mountpoint)
        })?;
        out.insert(i, fd);
    }
    Ok(out)
}

/// Mount `m` at its place below `top` ("" inside the namespace):
/// `source` is the copy to attach, for a host path or external one.
pub fn make_one(
    state: &MntState,
    m: &MountEntry,
    top: &str,
    source: Option<OwnedFd>,
    dir: &Path,
) -> Result<(), String> {
    let t = target(top, m);
    let t = if t.is_empty() { "/".to_string() } else { t };
    if std::fs::symlink_metadata(&t).is_err() {
        return Err(format!("its mountpoint {} does not exist", m.mountpoint));
    }
    match &m.how {
        Some(How::HostPath(_) | How::External(_)) => {
            let fd = source.ok_or("no copy of its source was taken")?;
            sysm::attach(&fd, &t).map_err(|e| format!("mounting it: {e}"))
        }
        Some(How::Bind(b)) => {
            let from = state
                .mounts
                .iter()
                .find(|f| f.id == b.mount)
                .ok_or_else(|| format!("it binds mount {}, which is not in the image", b.mount))?;
            let src = format!("{}/{}", target(top, from), b.subdir);
            mount(
                Some(src.as_str()),
                t.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(io(format!("binding {src}")))
        }
        Some(How::Fresh(_)) => fresh(m, &t, dir),
        None => Err("the image says nothing of how to make it".into()),
    }
}

/// A new filesystem for `m` at `t`; a tmpfs gets its files.
fn fresh(m: &MountEntry, t: &str, dir: &Path) -> Result<(), String> {
    let tmpfs = m.fstype == "tmpfs";
    // A read-only tmpfs is filled first, then made read-only.
    let ro = m.fs_options.split(',').any(|o| o == "ro");
    let opts: Vec<&str> = m
        .fs_options
        .split(',')
        .filter(|o| !(o.is_empty() || (tmpfs && *o == "ro")))
        .collect();
    let data = opts.join(",");
    mount(
        Some(m.source.as_str()),
        t,
        Some(m.fstype.as_str()),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(io(format!("mounting a new {} ({data})", m.fstype)))?;
    if tmpfs {
        let root = std::fs::File::open(t)
            .map(OwnedFd::from)
            .map_err(|e| format!("opening {t}: {e}"))?;
        super::tmpfs::restore(&root, dir, m.id)?;
        if ro {
            mount(
                None::<&str>,
                t,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                Some(data.as_str()),
            )
            .map_err(io("making it read-only".into()))?;
        }
    }
    Ok(())
}

/// The mount's own flags (read-only, nosuid, atime, ...), as dumped.
pub fn set_flags(m: &MountEntry, t: &str) -> Result<(), String> {
    let t = if t.is_empty() { "/" } else { t };
    let flags = MsFlags::from_bits_truncate(m.flags) | MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    mount(None::<&str>, t, None::<&str>, flags, None::<&str>).map_err(io(format!(
        "mount {} at {}: setting its flags",
        m.id, m.mountpoint
    )))
}

/// Set the mount at `t` to propagation `how` (MS_SHARED, MS_SLAVE, ...).
fn propagate(t: &str, how: MsFlags) -> Result<(), String> {
    mount(None::<&str>, t, None::<&str>, how, None::<&str>)
        .map_err(io(format!("setting the propagation of {t}")))
}

/// Peer groups and slaves, the namespace's own and cryo's (see [`Prop`]):
/// the first mount of each group of the namespace is made shared (after
/// it became the slave it is, if it is one), every other member joins it
/// (MOVE_MOUNT_SET_GROUP), a slave joins its master's group and turns
/// slave; then unbindable mounts. `top`: where the tree is.
fn propagation(
    state: &MntState,
    top: &str,
    yard: &str,
    groups: &mut HashMap<usize, OwnedFd>,
) -> Result<(), String> {
    let mut p = Prop {
        ms: &state.mounts,
        top,
        yard,
        groups,
    };
    let ms = &state.mounts;
    let live = |i: &usize| !ms[*i].late;
    let leaders: Vec<usize> = (0..ms.len())
        .filter(live)
        .filter(|&i| ms[i].shared != 0 && p.leader(ms[i].shared) == Some(i))
        .collect();
    // A leader that is a slave of another group's leader waits for it.
    let mut shared = vec![false; ms.len()];
    let mut pending = leaders.clone();
    while !pending.is_empty() {
        let before = pending.len();
        let mut next = Vec::new();
        for i in pending {
            if p.leader(ms[i].master).is_some_and(|l| !shared[l]) {
                next.push(i);
                continue;
            }
            p.slave(i)?;
            propagate(&p.at(i), MsFlags::MS_SHARED)?;
            shared[i] = true;
        }
        if next.len() == before {
            return Err("peer groups that are each other's masters".into());
        }
        pending = next;
    }
    for i in (0..ms.len()).filter(live).filter(|i| !leaders.contains(i)) {
        let m = &ms[i];
        if !m.host_group_path.is_empty() && !m.host_master {
            // A peer of a group of cryo's namespace.
            p.join_host(i)?;
        } else if let Some(l) = p.leader(m.shared) {
            // A peer of the group's first mount (a slave of its master).
            p.join_in(l, i)?;
        } else {
            p.slave(i)?;
        }
    }
    for i in (0..ms.len()).filter(live).filter(|&i| ms[i].unbindable) {
        propagate(&p.at(i), MsFlags::MS_UNBINDABLE)?;
    }
    Ok(())
}

/// The mounts of a namespace being built, for their propagation, and the
/// copies of mounts of cryo's namespace taken for its peer groups (by
/// mount index).
struct Prop<'a> {
    ms: &'a [MountEntry],
    top: &'a str,
    yard: &'a str,
    groups: &'a mut HashMap<usize, OwnedFd>,
}

impl Prop<'_> {
    /// Where mount `i` is.
    fn at(&self, i: usize) -> String {
        let t = target(self.top, &self.ms[i]);
        if t.is_empty() {
            "/".to_string()
        } else {
            t
        }
    }

    /// The first mount of peer group `g` of the namespace's own (not one
    /// of cryo's namespace, which each member joins on its own).
    fn leader(&self, g: u32) -> Option<usize> {
        let own = |m: &MountEntry| m.host_group_path.is_empty() || m.host_master;
        (g != 0).then_some(())?;
        self.ms
            .iter()
            .position(|m| !m.late && m.shared == g && own(m))
    }

    fn join_in(&self, from: usize, i: usize) -> Result<(), String> {
        sysm::set_group(&self.at(from), &self.at(i)).map_err(|e| {
            let (m, f) = (&self.ms[i], &self.ms[from]);
            format!(
                "mount {} at {}: joining the peer group of mount {}: {e}",
                m.id, m.mountpoint, f.id
            )
        })
    }

    fn join_host(&mut self, i: usize) -> Result<(), String> {
        let m = &self.ms[i];
        let copy = self
            .groups
            .remove(&i)
            .ok_or_else(|| format!("mount {}: no copy of its peer group's mount", m.id))?;
        join(&copy, &self.at(i), self.yard, i)
            .map_err(|w| format!("mount {} at {}: {w}", m.id, m.mountpoint))
    }

    /// Make mount `i` the slave it was, if it was one: a member of its
    /// master's group (the namespace's or cryo's), then MS_SLAVE.
    fn slave(&mut self, i: usize) -> Result<(), String> {
        let m = &self.ms[i];
        if m.master == 0 {
            return Ok(());
        }
        match self.leader(m.master) {
            Some(l) if !m.host_master => self.join_in(l, i)?,
            _ => self.join_host(i)?,
        }
        propagate(&self.at(i), MsFlags::MS_SLAVE)
    }
}

/// Make the private mount at `to` a peer of the mount `copy` is a copy
/// of: the copy is mounted for the moment on a directory of the yard,
/// joined from, and unmounted.
fn join(copy: &OwnedFd, to: &str, yard: &str, i: usize) -> Result<(), String> {
    let at = format!("{yard}/g{i}");
    std::fs::create_dir(&at).map_err(|e| format!("making {at}: {e}"))?;
    sysm::attach(copy, &at).map_err(|e| format!("mounting its peer group's copy: {e}"))?;
    let r = sysm::set_group(&at, to)
        .map_err(|e| format!("joining its peer group of cryo's namespace: {e}"));
    let _ = umount2(at.as_str(), MntFlags::MNT_DETACH);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryo_image::proto::BindOf;

    fn m(id: u32, parent: u32, mp: &str, how: How) -> MountEntry {
        MountEntry {
            id,
            parent,
            mountpoint: mp.into(),
            how: Some(how),
            ..Default::default()
        }
    }

    #[test]
    fn hostile_mount_trees_are_refused() {
        let root = m(1, 0, "/", How::HostPath("/".into()));
        let ok = MntState {
            mounts: vec![root.clone(), m(2, 1, "/a", How::Fresh(true))],
        };
        assert!(check(&ok).is_ok());
        let bind = |sub: &str, of: u32| {
            How::Bind(BindOf {
                mount: of,
                subdir: sub.into(),
            })
        };
        for bad in [
            vec![m(2, 1, "/a", How::Fresh(true))],
            vec![root.clone(), m(2, 1, "/../etc", How::Fresh(true))],
            vec![root.clone(), m(2, 1, "a", How::Fresh(true))],
            vec![root.clone(), m(2, 9, "/a", How::Fresh(true))],
            vec![root.clone(), m(2, 1, "/a", bind("../..", 1))],
            vec![root.clone(), m(2, 1, "/a", bind("x", 7))],
        ] {
            assert!(
                check(&MntState {
                    mounts: bad.clone()
                })
                .is_err(),
                "{bad:?}"
            );
        }
    }
}
