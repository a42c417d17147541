//! Cgroup settings: the controllers' limits of every cgroup the tree was
//! in, and making those cgroups again at restore.
//!
//! Dump: each cgroup a process was in (not a hierarchy's root) becomes a
//! cgroups.img record with the settings its controllers have (the files
//! of [`kept`], those that exist) and, on cgroup v2, the controllers its
//! parent enables for it.
//!
//! Restore, before any task exists: each cgroup goes where it was, or
//! under `--cgroup-root` (the deepest directory the tree's cgroups of a
//! hierarchy share is replaced by it), and `--manage-cgroups` says what
//! is done there, as with CRIU: `none` (join them; they must exist),
//! `props` (they must exist; their settings are written), `soft` (the
//! default: missing ones are made with their settings, existing ones are
//! left as they are and differences reported), `full` (made if missing,
//! settings written to all), `strict` (made if missing; one that exists
//! with other settings is refused), `ignore` (the tasks stay in cryo's
//! cgroups). The cgroups a failed restore made are removed.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use cryo_image::proto::{CgroupDir, CgroupEntry, CgroupSetting};

use super::cgroup_dir;

/// What a restore does with the tree's cgroups (CRIU's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Manage {
    None,
    Props,
    #[default]
    Soft,
    Full,
    Strict,
    Ignore,
}

impl std::str::FromStr for Manage {
    type Err = String;
    fn from_str(s: &str) -> Result<Manage, String> {
        Ok(match s {
            "none" => Manage::None,
            "props" => Manage::Props,
            "soft" => Manage::Soft,
            "full" => Manage::Full,
            "strict" => Manage::Strict,
            "ignore" => Manage::Ignore,
            _ => {
                return Err(format!(
                    "{s:?}: --manage-cgroups takes none, props, soft, full, strict or ignore"
                ))
            }
        })
    }
}

/// The settings files kept for a controller, in the order they are
/// written (cgroup v2 first, then v1's).
fn kept(controller: &str, v2: bool) -> &'static [&'static str] {
    match (controller, v2) {
        ("cpuset", _) => &["cpuset.cpus", "cpuset.mems"],
        ("memory", true) => &[
            "memory.min",
            "memory.low",
            "memory.high",
            "memory.max",
            "memory.swap.max",
        ],
        ("memory", false) => &[
            "memory.limit_in_bytes",
            "memory.soft_limit_in_bytes",
            "memory.swappiness",
        ],
        ("pids", _) => &["pids.max"],
        ("cpu", true) => &["cpu.weight", "cpu.max"],
        ("cpu", false) => &["cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"],
        ("io", true) => &["io.weight", "io.max"],
        ("blkio", false) => &["blkio.weight"],
        _ => &[],
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|v| v.trim().to_string())
}

/// The cgroups.img records of the cgroups in `memberships` (every
/// process's), read from cryo's view of the hierarchies.
pub fn collect<'a>(memberships: impl Iterator<Item = &'a CgroupEntry>) -> Vec<CgroupDir> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut seen: BTreeMap<(u32, String), &CgroupEntry> = BTreeMap::new();
    for e in memberships.filter(|e| e.path != "/") {
        seen.entry((e.hierarchy, e.path.clone())).or_insert(e);
    }
    let mut out = Vec::new();
    for e in seen.into_values() {
        let Some(dir) = cgroup_dir(&mountinfo, e) else {
            continue;
        };
        let v2 = e.hierarchy == 0;
        let controllers: Vec<String> = if v2 {
            dir.parent()
                .and_then(|p| read_trim(&p.join("cgroup.subtree_control")))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect()
        } else {
            e.controllers.split(',').map(str::to_string).collect()
        };
        let settings = controllers
            .iter()
            .flat_map(|c| kept(c, v2).iter())
            .filter_map(|name| {
                let value = read_trim(&dir.join(name))?;
                (!value.is_empty()).then(|| CgroupSetting {
                    name: name.to_string(),
                    value,
                })
            })
            .collect();
        out.push(CgroupDir {
            hierarchy: e.hierarchy,
            controllers: e.controllers.clone(),
            path: e.path.clone(),
            settings,
            enabled: if v2 { controllers } else { Vec::new() },
        });
    }
    out
}

/// Where the restore puts the tree's cgroups, and which it made.
#[derive(Debug, Default)]
pub struct CgroupPlan {
    /// Each dumped (hierarchy, path) to its directory here; empty with
    /// `ignore` (the tasks stay in cryo's cgroups).
    pub targets: super::Targets,
    /// The directories made, parents first.
    pub created: Vec<PathBuf>,
}

impl CgroupPlan {
    /// Remove the cgroups this restore made (deepest first), once their
    /// tasks are gone.
    pub fn remove_created(&mut self) {
        for d in self.created.drain(..).rev() {
            for _ in 0..100 {
                match std::fs::remove_dir(&d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
        }
    }
}

/// `path` with `root` in place of its first `common` components.
fn rebase(path: &str, common: &str, root: &str) -> String {
    let rest = path
        .strip_prefix(common)
        .unwrap_or(path)
        .trim_start_matches('/');
    let base = root.trim_end_matches('/');
    if rest.is_empty() {
        format!("{base}/")
    } else {
        format!("{base}/{rest}")
    }
}

/// The deepest directory every path shares.
fn common_dir<'a>(mut paths: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = paths.next() else {
        return "/".into();
    };
    let mut common: Vec<&str> = first.split('/').filter(|s| !s.is_empty()).collect();
    for p in paths {
        let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
        let n = common
            .iter()
            .zip(&parts)
            .take_while(|(a, b)| a == b)
            .count();
        common.truncate(n);
    }
    format!("/{}", common.join("/"))
}

/// Make `dir` and its missing parents (recorded in `created`); on cgroup
/// v2, enable `enabled` in each new one's parent first; a new v1 cpuset
/// (`cpuset`) gets its parent's CPUs and memory nodes (no task can join
/// one without), which its own settings, if any, replace after.
fn make_dirs(
    dir: &Path,
    enabled: &[String],
    cpuset: bool,
    created: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let mut missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
    missing.reverse();
    for d in missing {
        if !enabled.is_empty() {
            if let Some(parent) = d.parent() {
                let want: String = enabled.iter().map(|c| format!("+{c} ")).collect();
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), want.trim());
            }
        }
        std::fs::create_dir(d).map_err(|e| format!("making cgroup {}: {e}", d.display()))?;
        created.push(d.to_path_buf());
        if let (true, Some(parent)) = (cpuset, d.parent()) {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Some(v) = read_trim(&parent.join(f)) {
                    std::fs::write(d.join(f), v)
                        .map_err(|e| format!("setting {f} of cgroup {}: {e}", d.display()))?;
                }
            }
        }
    }
    Ok(())
}

fn write_settings(dir: &Path, settings: &[CgroupSetting]) -> Result<(), String> {
    for s in settings {
        // io.max and the like hold one line per device.
        for line in s.value.lines() {
            std::fs::write(dir.join(&s.name), line).map_err(|e| {
                format!(
                    "setting {} of cgroup {} to {line:?}: {e}",
                    s.name,
                    dir.display()
                )
            })?;
        }
    }
    Ok(())
}

/// The settings of `dir` that differ from the dumped ones.
fn differences(dir: &Path, settings: &[CgroupSetting]) -> Vec<String> {
    settings
        .iter()
        .filter_map(|s| {
            let now = read_trim(&dir.join(&s.name)).unwrap_or_default();
            (now != s.value).then(|| format!("{} is {now:?}, was {:?}", s.name, s.value))
        })
        .collect()
}

/// Where the tree's cgroups go: the deepest directory the tree's cgroups
/// of a hierarchy share is replaced by the root given for one of its
/// controllers (CRIU's cg_root entries, by controller name; "" for the v2
/// hierarchy), else by `all` (--cgroup-root), else kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct Roots<'a> {
    pub all: Option<&'a str>,
    pub by_controller: Option<&'a HashMap<String, String>>,
}

/// Put the tree's cgroups in place (cryo's view of the hierarchies), as
/// `mode` says: `memberships` are every process's, `dirs` cgroups.img's.
/// On failure every cgroup made here is removed again.
pub fn prepare<'a>(
    dirs: &[CgroupDir],
    memberships: impl Iterator<Item = &'a CgroupEntry> + Clone,
    mode: Manage,
    root: Roots,
) -> Result<CgroupPlan, String> {
    let mut plan = CgroupPlan::default();
    if mode == Manage::Ignore {
        return Ok(plan);
    }
    match place(dirs, memberships, mode, root, &mut plan) {
        Ok(()) => Ok(plan),
        Err(e) => {
            plan.remove_created();
            Err(e)
        }
    }
}

fn place<'a>(
    dirs: &[CgroupDir],
    memberships: impl Iterator<Item = &'a CgroupEntry> + Clone,
    mode: Manage,
    roots: Roots,
    plan: &mut CgroupPlan,
) -> Result<(), String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut by_hierarchy: BTreeMap<u32, Vec<&CgroupEntry>> = BTreeMap::new();
    for e in memberships {
        by_hierarchy.entry(e.hierarchy).or_default().push(e);
    }
    for entries in by_hierarchy.values() {
        let common = common_dir(entries.iter().map(|e| e.path.as_str()));
        for e in entries {
            let key = (e.hierarchy, e.path.clone());
            if plan.targets.contains_key(&key) {
                continue;
            }
            // A root of one of its controllers' (a v2 one's name is
            // empty), else the one of every hierarchy.
            let root = e
                .controllers
                .split(',')
                .find_map(|c| roots.by_controller.and_then(|m| m.get(c)))
                .map(String::as_str)
                .or(roots.all);
            let path = match root {
                Some(r) => rebase(&e.path, &common, r),
                None => e.path.clone(),
            };
            let placed = CgroupEntry {
                path: path.clone(),
                ..(*e).clone()
            };
            let dir = cgroup_dir(&mountinfo, &placed).ok_or_else(|| {
                format!(
                    "cgroup {} of hierarchy {} ({}) is not mounted here",
                    e.path, e.hierarchy, e.controllers
                )
            })?;
            let dumped = dirs
                .iter()
                .find(|d| d.hierarchy == e.hierarchy && d.path == e.path);
            let settings = dumped.map(|d| d.settings.as_slice()).unwrap_or_default();
            let enabled = dumped.map(|d| d.enabled.as_slice()).unwrap_or_default();
            let existed = dir.exists();
            match (mode, existed) {
                (Manage::None | Manage::Props, false) => {
                    return Err(format!(
                        "cgroup {} does not exist (--manage-cgroups {} does not make cgroups)",
                        dir.display(),
                        if mode == Manage::None {
                            "none"
                        } else {
                            "props"
                        }
                    ))
                }
                (_, false) => {
                    let cpuset =
                        e.hierarchy != 0 && e.controllers.split(',').any(|c| c == "cpuset");
                    make_dirs(&dir, enabled, cpuset, &mut plan.created)?;
                    write_settings(&dir, settings)?;
                }
                (Manage::Props | Manage::Full, true) => write_settings(&dir, settings)?,
                (Manage::Strict, true) => {
                    let diff = differences(&dir, settings);
                    if !diff.is_empty() {
                        return Err(format!(
                            "cgroup {} exists with other settings ({}); --manage-cgroups strict refuses it",
                            dir.display(),
                            diff.join(", ")
                        ));
                    }
                }
                (Manage::Soft, true) => {
                    let diff = differences(&dir, settings);
                    if !diff.is_empty() {
                        tracing::warn!(
                            "cgroup {} exists with other settings than at the dump, left as they are: {}",
                            dir.display(),
                            diff.join(", ")
                        );
                    }
                }
                (Manage::None | Manage::Ignore, true) => {}
            }
            let fd = std::fs::File::open(&dir)
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| format!("opening cgroup {}: {e}", dir.display()))?;
            plan.targets.insert(
                key,
                super::Target {
                    path: dir,
                    dir: std::sync::Arc::new(fd),
                },
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebasing() {
        let common = common_dir(["/a/b", "/a/b/c"].into_iter());
        assert_eq!(common, "/a/b");
        assert_eq!(rebase("/a/b/c", &common, "/new"), "/new/c");
        assert_eq!(rebase("/a/b", &common, "/new/"), "/new/");
        assert_eq!(common_dir(["/x", "/y"].into_iter()), "/");
        assert_eq!(rebase("/x", "/", "/r"), "/r/x");
        assert_eq!("strict".parse::<Manage>(), Ok(Manage::Strict));
        assert!("hard".parse::<Manage>().is_err());
    }
}
