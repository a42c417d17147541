//! Cgroup namespaces: the cgroup of each hierarchy that is the
//! namespace's root.
//!
//! Dump: the first task's cgroups as cryo sees them, and as a thread of
//! cryo's that enters the namespace sees them (relative to its roots):
//! each root is the first path with the second taken off its end. A task
//! outside its namespace's root ("/.." inside) is refused. Restore: the
//! namespace's first task, already in its own cgroups, moves into each
//! root (where the restore put its cgroups: the same number of levels up
//! from its own), unshares its cgroup namespace there, and goes back.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use cryo_image::proto::{CgroupEntry, CgroupNsState};

/// The roots of the cgroup namespace open at `ns`, through its task `pid`.
pub fn dump(ns: OwnedFd, pid: i32) -> Result<CgroupNsState, String> {
    let path = format!("/proc/{pid}/cgroup");
    let read = || std::fs::read_to_string(&path);
    let outside = read().map_err(|e| format!("reading {path}: {e}"))?;
    let inside = crate::sys::ns::in_namespace(ns, nix::sched::CloneFlags::CLONE_NEWCGROUP, read)
        .map_err(|e| format!("reading {path} inside it: {e}"))?;
    let inside = super::super::cgroup::parse_membership(&inside);
    let mut roots = Vec::new();
    for e in super::super::cgroup::parse_membership(&outside) {
        let rel = inside
            .iter()
            .find(|i| i.hierarchy == e.hierarchy && i.controllers == e.controllers)
            .map(|i| i.path.clone())
            .ok_or_else(|| {
                format!(
                    "hierarchy {} ({}) is not in its view",
                    e.hierarchy, e.controllers
                )
            })?;
        let root = root_of(&e.path, &rel).ok_or_else(|| {
            format!(
                "task {pid} is in cgroup {rel} of hierarchy {} ({}) as it sees it, outside the namespace's root: not supported",
                e.hierarchy, e.controllers
            )
        })?;
        roots.push(CgroupEntry {
            hierarchy: e.hierarchy,
            controllers: e.controllers,
            path: root,
        });
    }
    Ok(CgroupNsState { roots })
}

/// The root of a namespace in which cgroup `full` is seen as `rel`.
fn root_of(full: &str, rel: &str) -> Option<String> {
    if rel.starts_with("/..") {
        return None;
    }
    if rel == "/" {
        return Some(full.to_string());
    }
    let root = full.strip_suffix(rel)?;
    Some(if root.is_empty() {
        "/".into()
    } else {
        root.to_string()
    })
}

/// In the namespace's first task, in its cgroups `own` (placed at
/// `targets`): into each root, unshare, and back.
pub fn restore(
    st: Option<&CgroupNsState>,
    own: &[CgroupEntry],
    targets: &crate::cgroup::Targets,
) -> Result<(), String> {
    let st = st.ok_or("its roots are not in the image")?;
    if !targets.is_empty() {
        for r in &st.roots {
            let dir = root_dir(r, own, targets)?;
            std::fs::write(dir.join("cgroup.procs"), "0")
                .map_err(|e| format!("moving into its root {}: {e}", dir.display()))?;
        }
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("unshare(CLONE_NEWCGROUP): {}", std::io::Error::from(e)))?;
    crate::cgroup::join(own, targets)
}

/// Enter the cgroup namespace `fd` cryo made (one a user namespace of the
/// tree owns), then the task's own cgroups.
pub fn enter(
    fd: std::os::fd::RawFd,
    own: &[CgroupEntry],
    targets: &crate::cgroup::Targets,
) -> Result<(), String> {
    nix::sched::setns(
        crate::sys::fd::borrow(fd),
        nix::sched::CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| format!("entering it (setns): {}", std::io::Error::from(e)))?;
    crate::cgroup::join(own, targets)
}

/// Where root `r` is here: as many levels above where the task's own
/// cgroup of that hierarchy was put as that cgroup is below `r`.
pub(crate) fn root_dir(
    r: &CgroupEntry,
    own: &[CgroupEntry],
    targets: &crate::cgroup::Targets,
) -> Result<PathBuf, String> {
    let mine = own
        .iter()
        .find(|e| e.hierarchy == r.hierarchy && e.controllers == r.controllers)
        .ok_or_else(|| format!("it has no cgroup of hierarchy {}", r.hierarchy))?;
    let below = crate::ns::mnt::info::below(&mine.path, &r.path)
        .ok_or_else(|| format!("its cgroup {} is not below the root {}", mine.path, r.path))?;
    let up = below.split('/').filter(|c| !c.is_empty()).count();
    let placed = &targets
        .get(&(mine.hierarchy, mine.path.clone()))
        .ok_or_else(|| format!("cgroup {} has no place here", mine.path))?
        .path;
    placed
        .ancestors()
        .nth(up)
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} has no directory {up} levels up", placed.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_from_both_views() {
        assert_eq!(root_of("/a/b/child", "/child").as_deref(), Some("/a/b"));
        assert_eq!(root_of("/a/b", "/").as_deref(), Some("/a/b"));
        assert_eq!(root_of("/child", "/child").as_deref(), Some("/"));
        assert_eq!(root_of("/a/x", "/../x"), None);
        assert_eq!(root_of("/a/b", "/c"), None);
    }
}
