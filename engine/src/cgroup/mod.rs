//! Cgroup membership: which cgroup of each hierarchy a task is in (dump:
//! /proc/PID/cgroup), and moving a restored task back there (restore: the
//! new task writes itself into each cgroup's cgroup.procs before it sets
//! up its memory, which is then charged to them). The cgroups themselves,
//! their settings and where they go: [`props`].

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;

pub mod props;

use cryo_image::proto::CgroupEntry;

/// Parse /proc/PID/cgroup ("hierarchy-id:controllers:path" lines).
pub fn parse_membership(text: &str) -> Vec<CgroupEntry> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.parse().ok()?;
            let controllers = it.next()?.to_string();
            let path = it.next()?.to_string();
            Some(CgroupEntry {
                hierarchy: id,
                controllers,
                path,
            })
        })
        .collect()
}

/// Where the hierarchy of `e` is mounted, from mountinfo text: cgroup2 for
/// hierarchy 0, else the v1 mount whose options name the same controllers.
/// Returns the directory of the cgroup `e.path` in it.
pub fn cgroup_dir(mountinfo: &str, e: &CgroupEntry) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        let (pre, post) = line.split_once(" - ")?;
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let post: Vec<&str> = post.split_whitespace().collect();
        let (root, mnt) = (pre.get(3)?, pre.get(4)?);
        let (fstype, opts) = (post.first()?, post.get(2).unwrap_or(&""));
        let matches = if e.hierarchy == 0 {
            *fstype == "cgroup2"
        } else {
            *fstype == "cgroup" && {
                let have: Vec<&str> = opts.split(',').collect();
                !e.controllers.is_empty() && e.controllers.split(',').all(|c| have.contains(&c))
            }
        };
        if !matches {
            continue;
        }
        // The mount shows `root` of the hierarchy at `mnt`.
        let rel = if *root == "/" {
            e.path.as_str()
        } else {
            e.path.strip_prefix(*root)?
        };
        return Some(PathBuf::from(mnt).join(rel.trim_start_matches('/')));
    }
    None
}

/// Where the restore put one dumped cgroup: its path in cryo's view and
/// its directory, opened by cryo (a task of a mount namespace of the tree
/// may not see cryo's path: runc binds a container's own cgroup at
/// /sys/fs/cgroup/CONTROLLER).
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub dir: std::sync::Arc<std::os::fd::OwnedFd>,
}

/// Each dumped (hierarchy, path) to its place.
pub type Targets = HashMap<(u32, String), Target>;

/// Write `what` to the file `name` of the cgroup directory `dir`.
fn write_at(dir: &std::os::fd::OwnedFd, name: &str, what: &str) -> std::io::Result<()> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::write(&fd, what.as_bytes())?;
    Ok(())
}

/// The file `name` of the cgroup directory `dir`.
fn read_at(dir: &std::os::fd::OwnedFd, name: &str) -> std::io::Result<String> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s)?;
    Ok(s)
}

/// In a new task: join every dumped cgroup where the restore put it
/// (`targets`, by dumped hierarchy and path: [`props::prepare`]; none
/// with `--manage-cgroups ignore`), through the directories cryo opened.
pub fn join(entries: &[CgroupEntry], targets: &Targets) -> Result<(), String> {
    if targets.is_empty() {
        return Ok(());
    }
    for e in entries {
        let t = targets.get(&(e.hierarchy, e.path.clone())).ok_or_else(|| {
            format!(
                "cgroup {} of hierarchy {} ({}) has no place here",
                e.path, e.hierarchy, e.controllers
            )
        })?;
        if let Err(err) = write_at(&t.dir, "cgroup.procs", "0") {
            // A task of a user namespace of the tree may not write there,
            // but was put there before it joined (restore::spawn_in_userns).
            let me = std::process::id().to_string();
            let procs = read_at(&t.dir, "cgroup.procs").unwrap_or_default();
            if !procs.lines().any(|l| l.trim() == me) {
                return Err(format!("joining cgroup {}: {err}", t.path.display()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pure cgroup2 machine: the one hierarchy is /sys/fs/cgroup itself.
    #[test]
    fn pure_cgroup2_layout() {
        let m = parse_membership("0::/system.slice/app.service\n");
        let mi = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                  30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup_dir(mi, &m[0]),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/app.service"))
        );
    }

    #[test]
    fn membership_and_mounts() {
        let m = parse_membership("6:freezer:/a/b\n0::/x\n9:name=systemd:/\n");
        assert_eq!(m.len(), 3);
        assert_eq!(
            (
                m[0].hierarchy,
                m[0].controllers.as_str(),
                m[0].path.as_str()
            ),
            (6, "freezer", "/a/b")
        );
        let mi = "37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
                  40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_dir(mi, &m[0]),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/a/b"))
        );
        assert_eq!(
            cgroup_dir(mi, &m[1]),
            Some(PathBuf::from("/sys/fs/cgroup/unified/x"))
        );
        assert_eq!(
            cgroup_dir(mi, &m[2]),
            Some(PathBuf::from("/sys/fs/cgroup/systemd/"))
        );
    }
}
