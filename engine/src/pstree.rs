//! Discovery and seizing of a process tree: the processes under the roots
//! the user named (children of every thread, from
//! /proc/PID/task/TID/children), every thread of each, and the zombies
//! among them. Without a freezer, tasks are seized one by one and the tree
//! is walked again until a walk finds nothing new (a task that still runs
//! may fork or create threads; a stopped one cannot). With a freezer, the
//! whole cgroup is frozen, every task attached, then thawed.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

use crate::dump::DumpError;
use crate::infect::guard::Guard;
use crate::infect::Victim;
use crate::proc as procfmt;

type Result<T> = std::result::Result<T, DumpError>;

/// A seized process: its leader and every other thread, all stopped.
pub struct Seized {
    pub pid: i32,
    pub leader: Victim,
    pub threads: Vec<Victim>,
}

/// A zombie child inside the tree: it has exited, its parent has not
/// collected it yet.
#[derive(Debug, Clone)]
pub struct Zombie {
    pub stat: procfmt::Stat,
    pub pid: i32,
}

/// Every task of the dumped trees, stopped.
pub struct Tree {
    /// Live processes, each parent before its children, roots in the order
    /// given.
    pub procs: Vec<Seized>,
    pub zombies: Vec<Zombie>,
}

impl Tree {
    pub fn pids(&self) -> BTreeSet<i32> {
        self.procs
            .iter()
            .map(|p| p.pid)
            .chain(self.zombies.iter().map(|z| z.pid))
            .collect()
    }
}

/// /proc/PID/stat of a process, None if it is gone.
pub fn stat(pid: i32) -> Option<procfmt::Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    procfmt::parse_stat(&text)
}

/// The threads of process `pid` (leader first), from /proc/PID/task.
pub fn list_threads(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&dir).map_err(|source| DumpError::Proc {
        path: dir.clone(),
        source,
    })?;
    let mut tids: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&t| t != pid)
        .collect();
    tids.sort_unstable();
    tids.insert(0, pid);
    Ok(tids)
}

/// The children of every thread of `pid`, ascending.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            let path = e.path().join("children");
            if let Ok(text) = std::fs::read_to_string(path) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    out.into_iter().collect()
}

fn thread_exists(pid: i32, tid: i32) -> bool {
    Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

/// Register a stopped task with the guardian.
fn arm(guard: &Guard, v: &mut Victim, leader: Option<&Victim>) -> Result<()> {
    v.set_notifier(guard.notifier());
    if let Some(l) = leader {
        v.share_site(l);
    }
    let site = v.injection_site()?;
    guard.arm_state(v.pid, v.regs(), v.xstate(), v.sigmask(), site);
    Ok(())
}

/// Seize the threads of `p` not seized yet, until its thread list is
/// stable.
fn seize_new_threads(p: &mut Seized, guard: &Guard) -> Result<()> {
    let pid = p.pid;
    loop {
        let new: Vec<i32> = list_threads(pid)?
            .into_iter()
            .skip(1)
            .filter(|t| !p.threads.iter().any(|v| v.pid.as_raw() == *t))
            .collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            match Victim::seize(Pid::from_raw(tid)) {
                Ok(mut v) => {
                    arm(guard, &mut v, Some(&p.leader))?;
                    p.threads.push(v);
                }
                // It exited in between.
                Err(_) if !thread_exists(pid, tid) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    p.threads.sort_by_key(|v| v.pid.as_raw());
    Ok(())
}

/// What a walk found at a pid.
enum Found {
    Live,
    Zombie(procfmt::Stat),
    Gone,
}

fn look(pid: i32) -> Result<Found> {
    let Some(st) = stat(pid) else {
        return Ok(Found::Gone);
    };
    match st.state {
        'Z' | 'X' if st.num_threads > 1 => Err(DumpError::ZombieLeader {
            pid,
            threads: st.num_threads,
        }),
        'Z' | 'X' => Ok(Found::Zombie(st)),
        _ => Ok(Found::Live),
    }
}

/// Seize the trees under `roots`, freezing `freeze_cgroup` while
/// attaching if given. `check` runs on every live process before it is
/// seized (to refuse what cannot be dumped while nothing is touched yet).
pub fn seize_tree(
    roots: &[i32],
    freeze_cgroup: Option<&Path>,
    whole_cgroup: bool,
    guard: &Guard,
    check: &dyn Fn(i32) -> Result<()>,
) -> Result<Tree> {
    let mut procs: BTreeMap<i32, Seized> = BTreeMap::new();
    if let Some(dir) = freeze_cgroup {
        attach_frozen(roots, (dir, whole_cgroup), guard, check, &mut procs)?;
    }
    loop {
        let mut new = false;
        let mut order: Vec<i32> = Vec::new();
        let mut zombies: Vec<Zombie> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut queue: std::collections::VecDeque<i32> = roots.iter().copied().collect();
        while let Some(pid) = queue.pop_front() {
            if !seen.insert(pid) {
                continue;
            }
            let is_root = roots.contains(&pid);
            match look(pid)? {
                Found::Gone if is_root => return Err(DumpError::NoTask { pid }),
                Found::Gone => continue,
                Found::Zombie(_) if is_root => {
                    return Err(DumpError::RootZombie { pid });
                }
                Found::Zombie(stat) => {
                    zombies.push(Zombie { stat, pid });
                    continue;
                }
                Found::Live => {}
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = procs.entry(pid) {
                if let Err(e) = check(pid) {
                    // A child that ended while it was looked at: walk again.
                    if !is_root && !matches!(look(pid)?, Found::Live) {
                        new = true;
                        continue;
                    }
                    return Err(e);
                }
                let npid = Pid::from_raw(pid);
                let mut leader = match Victim::seize(npid) {
                    Ok(v) => v,
                    // It exited (or was reaped) in between: walk again.
                    Err(_) if !matches!(look(pid)?, Found::Live) && !is_root => {
                        new = true;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                arm(guard, &mut leader, None)?;
                slot.insert(Seized {
                    pid,
                    leader,
                    threads: Vec::new(),
                });
                new = true;
            }
            if let Some(p) = procs.get_mut(&pid) {
                seize_new_threads(p, guard)?;
            }
            order.push(pid);
            queue.extend(children(pid));
        }
        // Seized processes that left the tree (reparented away while
        // their parent still ran) are let go.
        procs.retain(|pid, _| order.contains(pid));
        if !new {
            let mut out = Vec::with_capacity(order.len());
            for pid in order {
                if let Some(p) = procs.remove(&pid) {
                    out.push(p);
                }
            }
            return Ok(Tree {
                procs: out,
                zombies,
            });
        }
    }
}

/// Freeze the cgroup, attach every task of the trees while frozen, thaw,
/// then wait for every stop.
fn attach_frozen(
    roots: &[i32],
    (dir, whole): (&Path, bool),
    guard: &Guard,
    check: &dyn Fn(i32) -> Result<()>,
    procs: &mut BTreeMap<i32, Seized>,
) -> Result<()> {
    // Declared before the freezer: on an error the cgroup thaws first, so
    // the attached tasks can stop and be let go.
    let mut attached: Vec<(i32, Victim, Vec<Victim>)> = Vec::new();
    let mut freezer = crate::freeze::Freezer::freeze(dir)?;
    let in_cgroup: BTreeSet<i32> = crate::freeze::procs(dir)?.into_iter().collect();
    let mut queue: std::collections::VecDeque<i32> = roots.iter().copied().collect();
    let mut seen = BTreeSet::new();
    let mut outside: Option<i32> = None;
    while let Some(pid) = queue.pop_front() {
        if !seen.insert(pid) {
            continue;
        }
        if !matches!(look(pid)?, Found::Live) {
            continue;
        }
        if !in_cgroup.contains(&pid) {
            outside.get_or_insert(pid);
            continue;
        }
        check(pid)?;
        let leader = Victim::attach(Pid::from_raw(pid))?;
        let mut threads = Vec::new();
        for tid in list_threads(pid)?.into_iter().skip(1) {
            match Victim::attach(Pid::from_raw(tid)) {
                Ok(v) => threads.push(v),
                Err(_) if !thread_exists(pid, tid) => {}
                Err(e) => return Err(e.into()),
            }
        }
        attached.push((pid, leader, threads));
        queue.extend(children(pid));
    }
    // Tasks moved into or out of the cgroup while it was walked (it is
    // frozen: a task moved in freezes too), or (the whole cgroup dumped)
    // in it but not below the roots, which were found before the freeze:
    // the dump starts again.
    crate::fault::hold("freeze-walked");
    let now: BTreeSet<i32> = crate::freeze::procs(dir)?.into_iter().collect();
    let unreached = whole && in_cgroup.iter().any(|p| !seen.contains(p));
    if now != in_cgroup || unreached {
        freezer.thaw()?;
        return Err(DumpError::CgroupChanged {
            cgroup: PathBuf::from(dir),
        });
    }
    // The stops requested by attach happen once the tasks thaw.
    freezer.thaw()?;
    if let Some(pid) = outside {
        return Err(DumpError::NotInCgroup {
            pid,
            cgroup: PathBuf::from(dir),
        });
    }
    for (pid, mut leader, threads) in attached {
        leader.wait_stopped()?;
        arm(guard, &mut leader, None)?;
        let mut p = Seized {
            pid,
            leader,
            threads: Vec::new(),
        };
        for mut v in threads {
            let tid = v.pid.as_raw();
            match v.wait_stopped() {
                Ok(()) => {
                    arm(guard, &mut v, Some(&p.leader))?;
                    p.threads.push(v);
                }
                Err(_) if !thread_exists(pid, tid) => {}
                Err(e) => return Err(e.into()),
            }
        }
        procs.insert(pid, p);
    }
    Ok(())
}
