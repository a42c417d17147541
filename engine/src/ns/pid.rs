//! pid namespaces: a task's pid at every level of the namespaces it is
//! in (NSpid, cryo's first), and what makes a tree of them restorable.
//!
//! Dump: each process records its pids, session and group at every level
//! (PstreeEntry.ns_pids, ns_sids, ns_pgids), each thread its tids
//! (CoreEntry.ns_tids). A namespace's first process in the tree must be
//! its init (pid 1 inside), made by a parent one level up (a task whose
//! children would go to another namespace than its own is refused, see
//! [`super::check`]).
//!
//! Restore: a task one level deeper than the task creating it is made
//! with CLONE_NEWPID, every task with clone3 `set_tid` holding its pid at
//! each level, innermost first. What a task names by pid (its group, a
//! pidfd's process, a descriptor's owner, a timer's thread) is given to
//! it as its namespace sees it ([`PidMap`]). The pid namespace has no
//! state of its own beyond its tasks.

#![forbid(unsafe_code)]

use std::collections::HashMap;

use cryo_image::proto::PstreeEntry;

use super::NsError;

/// The numbers of an NSpid-like /proc/PID/status value, one per level,
/// when there is more than one level (empty otherwise: all cryo's).
pub fn levels(v: Option<&str>) -> Vec<u32> {
    let n = v.map(crate::proc::status_numbers).unwrap_or_default();
    if n.len() > 1 {
        n
    } else {
        Vec::new()
    }
}

/// Thread `tid` of process `pid` at every level of its pid namespaces
/// (empty: all cryo's).
pub fn thread_levels(pid: i32, tid: u32) -> Vec<u32> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    levels(
        crate::proc::parse_status(&text)
            .get("NSpid")
            .map(String::as_str),
    )
}

/// The first process of a pid namespace (`top`, its pids from cryo's
/// level inward) must be its init, and one whose parent is not dumped
/// must be one level below cryo (the restore makes one namespace for it).
pub fn check_top(
    inode: u64,
    top: u32,
    ns_pids: &[u32],
    parent_dumped: bool,
) -> Result<(), NsError> {
    let shape = |what: String| NsError::Shape {
        ns: "pid".into(),
        inode,
        what,
    };
    let inner = ns_pids.last().copied().unwrap_or(top);
    if inner != 1 {
        return Err(shape(format!(
            "its init (pid 1 inside) is not in the dumped tree: task {top}, pid {inner} inside, is its first; dump the tree from the namespace's init"
        )));
    }
    if !parent_dumped && ns_pids.len() != 2 {
        return Err(shape(format!(
            "task {top}, its init, is {} pid namespaces below cryo's and its parent is not dumped: the restore can make only the innermost",
            ns_pids.len().saturating_sub(1)
        )));
    }
    Ok(())
}

/// A root of the dump (its parent is not dumped) in a pid namespace of
/// its own must be that namespace's init, one level below cryo's: checked
/// before the tree is seized.
pub fn check_root(pid: i32) -> Result<(), NsError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let levels = levels(
        crate::proc::parse_status(&text)
            .get("NSpid")
            .map(String::as_str),
    );
    if levels.is_empty() {
        return Ok(());
    }
    let inode = std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()
        .and_then(|l| super::inode(&l.display().to_string()))
        .unwrap_or(0);
    check_top(inode, pid as u32, &levels, false)
}

/// Every pid of an image (processes, threads, zombies, and the sessions
/// and groups they are in) at each level of its pid namespaces, cryo's
/// first: what a task is given when it names another by pid.
#[derive(Debug, Clone, Default)]
pub struct PidMap(HashMap<u32, Vec<u32>>);

impl PidMap {
    /// From the pstree entries of the processes and zombies and the
    /// threads' (tid, levels).
    pub fn new<'a>(
        entries: impl Iterator<Item = &'a PstreeEntry> + Clone,
        threads: impl Iterator<Item = (u32, &'a [u32])>,
    ) -> PidMap {
        let mut m: HashMap<u32, Vec<u32>> = HashMap::new();
        for e in entries.clone() {
            if e.ns_pids.len() > 1 {
                m.insert(e.pid, e.ns_pids.clone());
            }
        }
        for (tid, levels) in threads {
            if levels.len() > 1 {
                m.insert(tid, levels.to_vec());
            }
        }
        // A session or group whose leader exited: its members' view (the
        // helper standing in for it takes those pids).
        for e in entries {
            for (id, levels) in [(e.sid, &e.ns_sids), (e.pgid, &e.ns_pgids)] {
                if levels.len() > 1 {
                    m.entry(id).or_insert_with(|| levels.clone());
                }
            }
        }
        PidMap(m)
    }

    /// What the process of pstree entry `e` sees (as many pid namespaces
    /// deep as it has pids).
    pub fn view_of(&self, e: &PstreeEntry) -> View<'_> {
        View {
            map: self,
            depth: e.ns_pids.len(),
        }
    }

    /// `pid`'s levels, cryo's first (just `pid` when all are cryo's).
    pub fn levels(&self, pid: u32) -> Vec<u32> {
        self.0.get(&pid).cloned().unwrap_or_else(|| vec![pid])
    }

    /// Process (or thread, group) `pid`, as a task `depth` pid namespaces
    /// deep sees it (1: cryo's own); 0 (none) stays 0.
    pub fn seen_at(&self, pid: u32, depth: usize) -> Result<u32, String> {
        if pid == 0 || depth <= 1 {
            return Ok(pid);
        }
        self.0
            .get(&pid)
            .and_then(|l| l.get(depth - 1))
            .copied()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("process {pid} is not in its pid namespace (nor one below it)"))
    }
}

/// The pids of the tree as one task sees them.
#[derive(Clone, Copy)]
pub struct View<'a> {
    map: &'a PidMap,
    depth: usize,
}

impl View<'_> {
    /// Process (or thread, group) `pid` of cryo's view, as this task sees it.
    pub fn pid(&self, pid: u32) -> Result<u32, String> {
        self.map.seen_at(pid, self.depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_of_status_values() {
        assert_eq!(levels(Some("812\t1")), vec![812, 1]);
        assert!(levels(Some("812")).is_empty());
        assert!(levels(None).is_empty());
    }

    #[test]
    fn seen_from_inside() {
        let a = PstreeEntry {
            pid: 900,
            sid: 700,
            pgid: 900,
            ns_pids: vec![900, 1],
            ns_sids: vec![700, 0],
            ns_pgids: vec![900, 1],
            ..Default::default()
        };
        let b = PstreeEntry {
            pid: 901,
            pgid: 905,
            ns_pids: vec![901, 2],
            ns_pgids: vec![905, 3],
            ..Default::default()
        };
        let t: &[u32] = &[902, 4];
        let m = PidMap::new([&a, &b].into_iter(), std::iter::once((902, t)));
        assert_eq!(m.seen_at(901, 2), Ok(2));
        assert_eq!(m.seen_at(901, 1), Ok(901));
        assert_eq!(m.seen_at(902, 2), Ok(4));
        // A group whose leader exited, seen by its members.
        assert_eq!(m.seen_at(905, 2), Ok(3));
        // The session from outside is not seen inside.
        assert!(m.seen_at(700, 2).is_err());
        assert!(m.seen_at(901, 3).is_err());
        assert_eq!(m.levels(5), vec![5]);
    }
}
