//! The plan for rebuilding a process tree: which task creates which (with
//! clone3 `set_tid`), who calls setsid or leads a process group, and the
//! helper tasks that stand in for session and group leaders that had
//! exited at the dump (a helper takes the dead leader's pid, makes the
//! session or group, creates its members, and exits once they joined).
//! Zombies are recreated by their parent and exit with their dumped
//! status.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use super::image::TreeImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// `procs[i]` of the tree image.
    Task(usize),
    /// `zombies[i]`: exits with its dumped wait status.
    Zombie(usize),
    /// Stands in for a dead session (or group) leader; exits when the
    /// tree is built.
    Helper,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub pid: i32,
    /// Its pid at each level of its pid namespaces, cryo's first (`pid`
    /// alone when all are cryo's).
    pub tids: Vec<i32>,
    pub kind: NodeKind,
    /// The node that creates this one; None: cryo itself (a root).
    pub creator: Option<usize>,
    pub children: Vec<usize>,
    pub setsid: bool,
    /// Becomes the leader of its own process group in phase 1.
    pub group_leader: bool,
    /// Joins this process group in phase 2 (0: keep the inherited one).
    pub join_pgid: i32,
    pub exit_signal: i32,
    /// PR_SET_CHILD_SUBREAPER before anything else (orphans of helpers
    /// must fall to it, as they had at the dump).
    pub subreaper: bool,
    /// In a pid namespace a user namespace of the tree owns: its pid in
    /// cryo's is the kernel's choice (see `ns::user`), the others its own.
    pub host_free: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{what}; restoring this session layout is not supported yet")]
    Unsupported { what: String },
    #[error("{what}: such a pid namespace layout cannot be restored")]
    PidNamespaces { what: String },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub nodes: Vec<Node>,
}

impl Node {
    /// How many pid namespaces deep it is (1: cryo's).
    pub fn depth(&self) -> usize {
        self.tids.len().max(1)
    }

    /// Its pid as a task `depth` namespaces deep sees it (its creator, say).
    pub fn pid_at(&self, depth: usize) -> i32 {
        self.tids.get(depth.max(1) - 1).copied().unwrap_or(self.pid)
    }

    /// clone3's `set_tid`: its pids innermost first.
    pub fn set_tid(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.tids.iter().rev().copied().collect();
        if self.host_free {
            v.pop();
        }
        v
    }

    /// Whether it is made in a new pid namespace by a creator `depth`
    /// namespaces deep (1: cryo).
    pub fn new_pid_ns(&self, depth: usize) -> bool {
        self.depth() > depth
    }
}

impl Plan {
    pub fn roots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].creator.is_none())
    }

    pub fn index_of(&self, pid: i32) -> Option<usize> {
        self.nodes.iter().position(|n| n.pid == pid)
    }

    pub fn build(t: &TreeImage) -> Result<Plan, PlanError> {
        // (pid, ppid, pgid, sid, exit_signal, kind)
        let mut ents: Vec<(i32, i32, i32, i32, i32, NodeKind)> = Vec::new();
        let levels = |pid: i32| -> Vec<i32> {
            t.pids
                .levels(pid as u32)
                .into_iter()
                .map(|p| p as i32)
                .collect()
        };
        for (i, p) in t.procs.iter().enumerate() {
            let e = &p.pstree;
            ents.push((
                e.pid as i32,
                e.ppid as i32,
                e.pgid as i32,
                e.sid as i32,
                e.exit_signal as i32,
                NodeKind::Task(i),
            ));
        }
        for (i, e) in t.zombies.iter().enumerate() {
            ents.push((
                e.pid as i32,
                e.ppid as i32,
                e.pgid as i32,
                e.sid as i32,
                e.exit_signal as i32,
                NodeKind::Zombie(i),
            ));
        }
        let in_tree: BTreeSet<i32> = ents.iter().map(|e| e.0).collect();
        let info: BTreeMap<i32, (i32, i32, i32)> =
            ents.iter().map(|e| (e.0, (e.1, e.2, e.3))).collect();
        let mut nodes: Vec<Node> = ents
            .iter()
            .map(|&(pid, _, _, sid, exit_signal, kind)| Node {
                pid,
                tids: levels(pid),
                kind,
                creator: None,
                children: Vec::new(),
                setsid: sid == pid,
                group_leader: false,
                join_pgid: 0,
                exit_signal: if exit_signal > 0 && exit_signal < 65 {
                    exit_signal
                } else {
                    libc::SIGCHLD
                },
                subreaper: match kind {
                    NodeKind::Task(i) => t.procs[i]
                        .core
                        .process
                        .as_ref()
                        .is_some_and(|p| p.child_subreaper),
                    _ => false,
                },
                host_free: false,
            })
            .collect();
        let index: BTreeMap<i32, usize> =
            nodes.iter().enumerate().map(|(i, n)| (n.pid, i)).collect();
        // The groups and sessions the roots were in outside the tree: the
        // roots are in cryo's, and tasks inherit them from there.
        let external: BTreeSet<i32> = ents
            .iter()
            .filter(|e| !info.contains_key(&e.1))
            .flat_map(|e| [e.2, e.3])
            .filter(|id| !in_tree.contains(id))
            .collect();
        // Helpers by the pid they stand in for.
        let mut helpers: BTreeMap<i32, usize> = BTreeMap::new();
        // A helper is in its creator's pid namespace: its members' view of
        // the leader's pid down to there.
        let new_helper = |nodes: &mut Vec<Node>, pid: i32, creator: usize, session: bool| {
            let mut tids = levels(pid);
            tids.truncate(nodes[creator].depth());
            nodes.push(Node {
                pid,
                tids,
                kind: NodeKind::Helper,
                creator: Some(creator),
                children: Vec::new(),
                setsid: session,
                group_leader: !session,
                join_pgid: 0,
                exit_signal: libc::SIGCHLD,
                subreaper: false,
                host_free: false,
            });
            nodes.len() - 1
        };
        for &(pid, ppid, _, sid, _, _) in &ents {
            let me = index[&pid];
            let Some(&(_, _, psid)) = info.get(&ppid) else {
                continue; // a root: created by cryo, in cryo's session
            };
            let parent = index[&ppid];
            let creator = if sid == pid || sid == psid {
                parent
            } else if !in_tree.contains(&sid) && !external.contains(&sid) {
                // A session whose leader exited: a helper with its pid,
                // created by the parent, creates this task.
                match helpers.get(&sid) {
                    Some(&h) if nodes[h].creator == Some(parent) => h,
                    Some(_) => {
                        return Err(PlanError::Unsupported {
                            what: format!(
                                "task {pid} is in session {sid}, whose exited leader also had children under another parent"
                            ),
                        })
                    }
                    None => {
                        let h = new_helper(&mut nodes, sid, parent, true);
                        helpers.insert(sid, h);
                        h
                    }
                }
            } else {
                return Err(PlanError::Unsupported {
                    what: format!(
                        "task {pid} is in session {sid}, which is neither its own nor its parent's {psid}"
                    ),
                });
            };
            nodes[me].creator = Some(creator);
        }
        // Process groups.
        for &(pid, _, pgid, _, _, _) in &ents {
            let me = index[&pid];
            if pgid == pid {
                nodes[me].group_leader = !nodes[me].setsid;
                continue;
            }
            if nodes[me].creator.is_none() {
                continue; // a root keeps cryo's group unless it leads one
            }
            if external.contains(&pgid) {
                continue; // inherited from a root, which is in cryo's group
            }
            if !in_tree.contains(&pgid) && !helpers.contains_key(&pgid) {
                // A group whose leader exited: a helper in the member's
                // session (made by the member's creator) leads it.
                let creator = nodes[me].creator.unwrap_or(0);
                let h = new_helper(&mut nodes, pgid, creator, false);
                helpers.insert(pgid, h);
            }
            nodes[me].join_pgid = pgid;
        }
        for i in 0..nodes.len() {
            if let Some(c) = nodes[i].creator {
                nodes[c].children.push(i);
            }
        }
        for n in nodes.iter_mut() {
            n.children.sort_unstable();
        }
        check_depths(&nodes)?;
        mark_host_free(t, &mut nodes);
        // A task sharing its parent's descriptor table is created by it.
        for n in &nodes {
            let NodeKind::Task(i) = n.kind else { continue };
            let e = &t.procs[i].pstree;
            let by_parent = n.creator.is_some_and(|c| {
                nodes[c].pid == e.ppid as i32 && matches!(nodes[c].kind, NodeKind::Task(_))
            });
            if e.shares_files && !by_parent {
                return Err(PlanError::Unsupported {
                    what: format!(
                        "task {} shares its parent {}'s descriptor table (CLONE_FILES) but is created by a stand-in for its session's exited leader",
                        e.pid, e.ppid
                    ),
                });
            }
        }
        Ok(Plan { nodes })
    }
}

/// A root whose pid namespace one of the tree's user namespaces owns, and
/// every node below it in that pid namespace (one inside is refused at
/// the dump), get the kernel's pid in cryo's namespace.
fn mark_host_free(t: &TreeImage, nodes: &mut [Node]) {
    let in_owned_pid_ns = |n: &Node| {
        let NodeKind::Task(k) = n.kind else {
            return false;
        };
        let ids = t.procs[k]
            .core
            .process
            .iter()
            .flat_map(|p| p.namespaces.iter());
        let pid_ns = ids
            .filter(|i| i.kind == "pid" && !i.host)
            .map(|i| i.inode)
            .next();
        pid_ns.is_some_and(|inode| {
            t.namespaces.iter().any(|e| {
                e.kind == "pid"
                    && e.inode == inode
                    && t.namespaces
                        .iter()
                        .any(|u| u.kind == "user" && u.inode == e.owner)
            })
        })
    };
    for i in 0..nodes.len() {
        // The root this node is made under.
        let mut root = i;
        while let Some(c) = nodes[root].creator {
            root = c;
        }
        nodes[i].host_free =
            nodes[root].depth() == nodes[i].depth() && in_owned_pid_ns(&nodes[root]);
    }
}

/// Each task is in its creator's pid namespace or one level below it (a
/// root: below cryo's), with a pid at every level up to cryo's, and one
/// it is the init of (pid 1 inside) when it is below.
fn check_depths(nodes: &[Node]) -> Result<(), PlanError> {
    for n in nodes {
        let above = n.creator.map_or(1, |c| nodes[c].depth());
        let what = if n.depth() < above || n.depth() > above + 1 {
            format!(
                "task {} is {} pid namespaces deep, the task creating it {above}",
                n.pid,
                n.depth()
            )
        } else if n.depth() > above && n.tids.last() != Some(&1) {
            format!(
                "task {} would be the first of a new pid namespace but has pid {:?} inside, not 1",
                n.pid,
                n.tids.last()
            )
        } else if n.tids.first() != Some(&n.pid) {
            format!(
                "task {}: its pids in its pid namespaces are inconsistent",
                n.pid
            )
        } else {
            continue;
        };
        return Err(PlanError::PidNamespaces { what });
    }
    Ok(())
}
